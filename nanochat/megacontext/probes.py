"""
Recall probes: why a working context does or does not recall a fact (the recall testbed, issue 15).

- fact_block(history, answer): the LOD0 block of the history where the answer's value first
  occurs (the fact that states it), found by its tokens.
- raw_blocks(wc): the blocks a WC holds as raw tokens; a fact block among them can be copied
  from as full attention does, otherwise the model must read it out of a gist.
- digit_probe(features, values): can a linear map read each digit of a value from a vector?
  A ridge least-squares fit from (N, D) features to one-hot digits on the first half, scored as
  the argmax accuracy per digit on the other half (chance 0.1). Run on the fact block's gist it
  answers "does the gist carry the answer".
"""

import torch

from nanochat.megacontext import BLOCK_SIZE

K = BLOCK_SIZE


def fact_block(history, answer):
    """history: ids (list or 1-D tensor), answer: ids of " <value>." -> the block index (token // K)
    where answer[:-1] (the value without its final '.') first occurs, or None."""
    h = history.tolist() if torch.is_tensor(history) else list(history)
    a = answer.tolist() if torch.is_tensor(answer) else list(answer)
    needle = a[:-1] if len(a) > 1 else a
    for i in range(len(h) - len(needle) + 1):
        if h[i:i + len(needle)] == needle:
            return (i + len(needle) - 1) // K  # the block holding the value's last token
    return None


def raw_blocks(wc):
    """The LOD0 block indices a (one-memory) WorkingContext holds as raw tokens."""
    return {e.index for e in wc.entries if e.level == 0}


def answer_spans(weights):
    """weights (T,) 0/1 floats or bools -> [(start, end)]: the runs of scored targets."""
    spans, start = [], None
    for j, w in enumerate(list(weights.tolist()) + [0]):
        if w and start is None:
            start = j
        elif not w and start is not None:
            spans.append((start, j))
            start = None
    return spans


def digit_probe(features, values, ridge=1e-2):
    """features (N, D) float, values: N equal-length digit strings -> held-out accuracy of each digit
    position, fit on the first N // 2 and scored on the rest (needs N >= 4)."""
    n = features.size(0)
    if n < 4 or len(values) != n:
        raise ValueError(f"digit_probe needs >= 4 features with one value each, got {n} and {len(values)}")
    x = torch.cat([features.double(), torch.ones(n, 1, dtype=torch.float64)], dim=1)  # (N, D + 1) with a bias
    digits = torch.tensor([[int(c) for c in v] for v in values])  # (N, P)
    half = n // 2
    xtr, xte = x[:half], x[half:]
    gram = xtr.T @ xtr + ridge * half * torch.eye(x.size(1), dtype=torch.float64)
    out = []
    for p in range(digits.size(1)):
        y = torch.nn.functional.one_hot(digits[:half, p], 10).double()  # (half, 10)
        w = torch.linalg.solve(gram, xtr.T @ y)  # (D + 1, 10)
        out.append(((xte @ w).argmax(dim=1) == digits[half:, p]).double().mean().item())
    return out
