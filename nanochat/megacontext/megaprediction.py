"""
MegaPrediction: the base model learns to predict the gist of the block it is about to write
(design: shared/spec/megacontext.md, "MegaPrediction (gist-first inference)").

Readouts. A row of T tokens is cut into level-L blocks of span = 32**L tokens on the row's own grid
(token 0 of the row starts block 0). The hidden state at the last token of block j-1, position
t = j * span - 1, has read that whole block and nothing after it (causal attention), so it is the
"latest node" of the current block, and it predicts the gist of the next block [t+1, t+1+span)
(readout_slots). One readout per complete next block; the row's last, unfinished block has none.

MegaPredictor maps such a hidden state (the final residual stream, GPT.forward(return_hidden=True))
into the token-embedding space gists live in:
    pred = norm(head(norm(h) * (1 + gain_L)) + bias_L)
one shared head for every level (D x D), plus a per-level gain and bias (2 x D each level): the gain
reweights the features a level reads, the bias carries that level's mean gist direction. The head
starts random (std 1 / sqrt(D), like the model's own matrices) and the per-level parts at zero, so
the cosine loss has a gradient from step 0 (a zero head would put norm() at its singular point).

Training (base_train --megacontext --megaprediction): the hidden states come from the LM forward on
the raw rows (no second forward); the targets are GistNet's gists of the true next blocks, built
under no_grad: GistNet is the fixed measuring stick here, the readout and the model learn to hit it
(a GistNet trained by this loss could satisfy it by collapsing every gist to one vector).
    loss_L = mean over rows and slots of 1 - cos(pred, target)
and base_train adds sum_L mp_alpha_lodL * loss_L to the LM loss before its backward.

Evaluation (predicted_gist_dnll): the cost of using a predicted gist in place of the real one, as
DeltaNLL@H. Per validation row: the MC path's starting WC (WorkingContext.recency_filled, fit to
w_max); its newest level-L gist (the one just before the raw recent tokens, or before the finer gists)
is replaced by the predictor's gist, read from the hidden state at the token just before that block
over the true raw history (the same grid position training reads); the horizon NLL with the
predicted gist minus the NLL with the true one. A row whose WC has no level-L gist past token 0 does
not count for level L.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.gpt import Linear, norm
from nanochat.megacontext import BLOCK_SIZE
from nanochat.megacontext.gistnet import build_gists_batch
from nanochat.megacontext.horizon import SequenceSource, build_source, horizon_nlls, split_point
from nanochat.megacontext.working_context import WorkingContext, fit_budget

K = BLOCK_SIZE


class MegaPredictor(nn.Module):
    """hidden (..., D) at a block's last token -> (..., D) the predicted gist of the next level-L block,
    normalized like token embeddings."""

    def __init__(self, dim, max_level):
        super().__init__()
        if max_level < 1:
            raise ValueError(f"MegaPredictor max_level must be >= 1, got {max_level}")
        self.dim, self.max_level = dim, max_level
        self.head = Linear(dim, dim)  # shared by every level: hidden space -> embedding space
        self.level_gain = nn.Parameter(torch.zeros(max_level, dim))  # row L-1: level L's feature gain minus 1
        self.level_bias = nn.Parameter(torch.zeros(max_level, dim))  # row L-1: level L's bias in embedding space
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """A random head, zero per-level parts. Callable again after to_empty()."""
        bound = math.sqrt(3.0 / self.dim)  # uniform with std 1/sqrt(dim): unit-scale outputs from norm'd inputs
        nn.init.uniform_(self.head.weight, -bound, bound)
        self.level_gain.zero_()
        self.level_bias.zero_()

    def forward(self, hidden, level):
        if not 1 <= level <= self.max_level:
            raise ValueError(f"MegaPredictor level must be in 1..{self.max_level}, got {level}")
        x = norm(hidden)  # (..., D)
        x = x * (1 + self.level_gain[level - 1].to(x.dtype))
        return norm(self.head(x) + self.level_bias[level - 1].to(x.dtype))  # (..., D)


def level_weights(config):
    """{level: alpha} of the MegaPrediction losses (LOD1, LOD2) a MegaContextConfig trains."""
    return {L: a for L, a in ((1, config.mp_alpha_lod1), (2, config.mp_alpha_lod2)) if L <= config.max_level}


def readout_slots(T, level):
    """The positions t (a range) in a row of T tokens whose hidden states predict the next level block:
    t = j * span - 1 for j >= 1 with the next block [t+1, t+1+span) inside the row. The off-by-one: the
    block before the prediction is [t+1-span, t+1); its last token is t, the first position whose
    hidden state has read all of it (position t sees tokens 0..t), and the last one that has read
    nothing of the block it predicts (which starts at t+1). Slot j-1 of the range predicts block j."""
    span = K ** level
    return range(span - 1, T - span, span)  # t + 1 + span <= T  <=>  t < T - span


def megaprediction_loss(predictor, gistnet, model, hidden, ids, levels):
    """hidden (B, T, C) from the LM forward on ids (B, T) -> (loss_by_level {L: scalar mean 1 - cos},
    cos_by_level {L: float}) over every readout slot of every row; a level without one is absent.
    Gradients reach the predictor and the model (through hidden), never GistNet (the targets)."""
    T = ids.size(1)
    slots = {L: readout_slots(T, L) for L in levels}
    slots = {L: r for L, r in slots.items() if len(r) > 0}
    if not slots:
        return {}, {}
    with torch.no_grad():  # the targets: the gists of every complete block of each row
        pyramids = build_gists_batch(list(model.embed_tokens(ids)), gistnet, max(slots))  # B x [(T, D), (T // 32, D), ...]
    losses, cosines = {}, {}
    for L, r in slots.items():
        n = len(r)
        pred = predictor(hidden[:, r.start:r.stop:r.step], L).float()  # (B, n, D): readout i at t = (i + 1) * span - 1 ...
        true = torch.stack([p[L][1:n + 1] for p in pyramids]).float()  # (B, n, D): ... predicts block i + 1
        cos = F.cosine_similarity(pred, true, dim=-1)  # (B, n)
        losses[L] = (1 - cos).mean()
        cosines[L] = cos.mean().item()
    return losses, cosines


@torch.no_grad()
def predicted_gist_dnll(predictor, gistnet, model, mc_config, rows, bos_id=None, levels=None):
    """rows: (R, N) long (or a list of (N_i,)), each cut where training cuts it (horizon.split_point;
    bos_id None: the last H tokens are the horizon) -> {L: mean DeltaNLL@H of the predicted newest
    level-L gist vs the true one} over the rows where it is measurable (see the top); levels default
    to those MegaPrediction trains. The caller puts the modules in eval mode."""
    cfg, H = mc_config, mc_config.horizon
    levels = list(level_weights(cfg)) if levels is None else list(levels)
    jobs = []  # (row, level (0: the true gists), WC, source, horizon)
    for b, row in enumerate(rows):
        c = split_point(row, bos_id, H, cfg.w_max)
        history, horizon = row[:c], row[c:c + H]
        source = build_source(model, gistnet, history, cfg.max_level)
        wc = fit_budget(WorkingContext.recency_filled(source, cfg.w_max, cfg.recent_tokens, cfg.max_level), cfg.w_max)
        newest = {}  # level -> its newest gist Entry in the WC, if that block has a token before it
        for e in wc.entries:
            if e.level in levels and e.start > 0:
                newest[e.level] = e
        if not newest:
            continue
        _, hidden = model(history[None, :max(e.start for e in newest.values())], return_hidden=True)  # (1, s, C): the true raw context
        jobs.append((b, 0, wc, source, horizon))
        for L, e in newest.items():
            gist = predictor(hidden[0, e.start - 1], L)  # (D,) read at the block's previous token, as in training
            pyramid = list(source.levels)
            pyramid[L] = pyramid[L].clone()
            pyramid[L][e.index] = gist.to(pyramid[L].dtype)
            jobs.append((b, L, wc, SequenceSource(source.token_ids, pyramid), horizon))
    if not jobs:
        return {}
    nll, _ = horizon_nlls(model, [j[2] for j in jobs], [j[3] for j in jobs], [j[4] for j in jobs])  # R x (H,)
    true = {b: n.mean().item() for (b, L, *_), n in zip(jobs, nll) if L == 0}
    deltas = {}
    for (b, L, *_), n in zip(jobs, nll):
        if L > 0:
            deltas.setdefault(L, []).append(n.mean().item() - true[b])
    return {L: sum(d) / len(d) for L, d in sorted(deltas.items())}
