"""
Dense recall rows: the recall testbed's data mode (base_train --recall-facts N; configs/cpu_recall.toml).

Each row of n tokens is one document, built in tokens so that it is exactly n long:
    BOS, natural filler (the split's own texts) with N facts spliced in at random places,
    then N questions, one per fact in random order, each followed by its answer;
the row ends with the last answer. A fact and its question are the passkey kind of longrange.py
with a named key, so `mc_eval --task passkey` ("The pass key is ...") asks the trained form:
    fact      "The <word> key is 48213. Remember it. 48213 is the <word> key."
    question  "What is the <word> key? The <word> key is"      answer " 48213."
<word> is "pass" for a fact a quarter of the time, else a random two-syllable word (unique per row).
Pieces are encoded apart and joined at "\\n\\n" (SEP), where the tokenizer splits anyway, and the
answer apart from its question, as mc_eval's retrieval documents do.
Targets are -1 (ignored by the loss) everywhere but the answers' tokens: the loss is the recall
loss alone. N shrinks on a short row until facts and questions take at most half of it.

Curriculum: the first `short_batches` micro-batches hold rows of short_len tokens (B * T // short_len
of them, the same tokens per micro-batch); the rest rows of T. A model that first learns to copy over
short distances then learns it far back; one trained on long rows from the start learns it much later.

Order and resume: micro-batch i is a function of (seed, split, rank, world_size, i) alone, its filler
read from row groups it draws, so the state {"recall_batch": i, ...} resumes exactly.
"""

import random

import torch

from nanochat.common import UserError, get_dist_info
from nanochat.dataset import split_paths, row_group_offsets, locate_row_group, read_row_group
from nanochat.longrange import SEP, random_word

PASS_WORD_P = 0.25  # how often a fact's key is "pass", the word mc_eval --task passkey asks about
MIN_FACT_TOKENS = 16  # a fact, its question and answer take more tokens than this under any tokenizer (~35 with 4k tokens)
CACHE_TOKENS = 1 << 26  # filler kept tokenized, int32: 256 MiB (all of pystdlib's 72 row groups, ~64 of climbmix's)


def recall_facts(rng, n_facts):
    """n_facts (fact, question, answer) texts with distinct key words and random 5-digit values."""
    words = []
    while len(words) < n_facts:
        word = "pass" if rng.random() < PASS_WORD_P else random_word(rng, 2)
        if word not in words:
            words.append(word)
    out = []
    for word in words:
        value = str(rng.randint(10000, 99999))
        out.append((f"The {word} key is {value}. Remember it. {value} is the {word} key.",
                    f"What is the {word} key? The {word} key is", f" {value}."))
    return out


def recall_row(rng, n, n_facts, encode, bos, filler, back=None):
    """One row -> (ids, answer): ids (n,) ints starting with bos, answer (n,) bools marking the answers'
    tokens. encode(text) -> ids; filler(count) -> `count` natural-text token ids. back = (lo, hi), one
    fact only: the fact starts d tokens before the answer, d uniform in [lo, hi] (clipped to the row)."""
    n_facts = min(n_facts, max(1, (n - 1) // (2 * MIN_FACT_TOKENS)))  # no more than half a row can hold: a start
    while True:                                                          # that fits (--recall-facts 100000 never ended)
        facts = recall_facts(rng, n_facts)
        fact_ids = [encode(SEP + fact + SEP) for fact, _, _ in facts]
        order = rng.sample(range(len(facts)), len(facts))
        qa_ids = [(encode(SEP + facts[i][1]), encode(facts[i][2])) for i in order]
        used = sum(map(len, fact_ids)) + sum(len(q) + len(a) for q, a in qa_ids)
        if 2 * used <= n - 1 or n_facts == 1:
            break
        n_facts -= 1
    if used + 1 > n:
        raise UserError(f"a recall row of {n} tokens cannot hold one fact and its question ({used + 1} tokens)")
    body = filler(n - 1 - used)
    cuts = sorted(rng.randint(0, len(body)) for _ in fact_ids)  # where each fact goes in the filler
    if back is not None:
        if len(fact_ids) != 1:
            raise UserError("a recall row with the fact at a set distance holds one fact")
        d = rng.randint(*back)  # the answer is at n - len(answer): the fact starts at 1 + cut
        cuts = [min(len(body), max(0, n - len(qa_ids[0][1]) - 1 - d))]
    ids, answer, prev = [bos], [False], 0
    for cut, f in zip(cuts, fact_ids):
        ids += body[prev:cut] + f
        prev = cut
    ids += body[prev:]
    for q, a in qa_ids:
        ids += q + a
        answer += [False] * (len(ids) - len(answer) - len(a)) + [True] * len(a)
    assert len(ids) == n == len(answer), (len(ids), n, len(answer))
    return ids, answer


def recall_loader(tokenizer, B, T, split, n_facts, device="cpu", resume_state_dict=None, short_len=0, short_batches=0,
                  seed=0, back=None, data_dir=None, shard=None):
    """Infinite generator of (inputs (B', T') int64, targets (B', T') int64 with -1 off the answers,
    state_dict); B', T' = B * T // short_len, short_len for the first short_batches micro-batches, else B, T.
    shard: (rank, world_size) whose rows to draw (default this process's)."""
    if n_facts < 1:
        raise UserError(f"recall rows need at least one fact, got --recall-facts {n_facts}")
    if short_batches > 0 and not (0 < short_len <= T and (B * T) % short_len == 0):
        raise UserError(f"the recall curriculum's short rows ({short_len} tokens) must divide the micro-batch "
                        f"of {B} x {T} tokens and be at most {T} long")
    rank, world_size = shard if shard is not None else get_dist_info()[1::2]
    paths = split_paths(split, data_dir)
    offsets = row_group_offsets(paths)
    bos = tokenizer.get_bos_token_id()
    sep = tokenizer.encode(SEP)
    device = torch.device(device)
    cache = {}  # row group index -> its texts' token ids joined by SEP, (N,) int32; the oldest dropped past CACHE_TOKENS

    def row_group_tokens(g):
        if g not in cache:
            pq_idx, rg_idx = locate_row_group(offsets, g)
            ids = [t for doc in tokenizer.encode(read_row_group(paths[pq_idx], rg_idx)) for t in doc + sep]
            if not ids:
                raise UserError(f"row group {rg_idx} of {paths[pq_idx]} holds no text to use as filler")
            cache[g] = torch.tensor(ids, dtype=torch.int32)
            while len(cache) > 1 and sum(map(len, cache.values())) > CACHE_TOKENS:
                cache.pop(next(iter(cache)))
        return cache[g]

    i = 0
    if resume_state_dict is not None:
        if "recall_batch" not in resume_state_dict:
            raise UserError("the checkpoint's dataloader state is not a recall loader's (no recall_batch): "
                            "was it trained without --recall-facts?")
        i = int(resume_state_dict["recall_batch"])
    while True:
        rng = random.Random(f"recall/{seed}/{split}/{rank}/{world_size}/{i}")

        def filler(count):  # `count` consecutive tokens of a random row group's text, from a random start
            ids = row_group_tokens(rng.randrange(offsets[-1]))
            start = rng.randrange(len(ids))
            return ids[start:start + count].tolist() if start + count <= len(ids) else \
                (ids[start:].tolist() + ids.tolist() * (count // len(ids) + 1))[:count]

        n = short_len if i < short_batches else T
        rows, masks = [], []
        for _ in range(B * T // n):
            ids, answer = recall_row(rng, n + 1, n_facts, tokenizer.encode, bos, filler, back)
            rows.append(ids)
            masks.append(answer)
        batch = torch.tensor(rows, dtype=torch.long)  # (B', n + 1)
        keep = torch.tensor(masks)[:, 1:]  # (B', n): target j is row token j + 1
        inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].masked_fill(~keep, -1).contiguous()
        i += 1
        state = {"recall_batch": i, "rank": rank, "world_size": world_size}
        yield inputs.to(device), targets.to(device), state


def recall_eval_docs(tokenizer, n, num_docs, split="val", seed=0, back=None, data_dir=None):
    """num_docs (history ids, answer ids): recall rows of n tokens with one fact each (the training
    format, the split's filler; back as recall_row takes it), cut before their answer; the same
    documents for every call, on every rank and under any number of ranks."""
    if num_docs < 1:
        raise UserError(f"the recall probe needs at least one document, got --recall-eval-docs {num_docs}")
    loader = recall_loader(tokenizer, num_docs, n - 1, split, 1, seed=seed, back=back, data_dir=data_dir, shard=(0, 1))
    x, y, _ = next(loader)  # (num_docs, n - 1): inputs and masked targets
    docs = []
    for xs, ys in zip(x.tolist(), y.tolist()):
        ids = xs + [ys[-1]]
        a = sum(t >= 0 for t in ys)  # the answer's length: the scored targets, the row's last tokens
        docs.append((ids[:-a], ids[-a:]))
    return docs


@torch.no_grad()
def recall_accuracy(model, docs, window=None, device="cpu"):
    """docs: [(history ids, answer ids)] -> the fraction whose every answer token greedy argmax predicts,
    teacher forced, after the whole history (or its newest `window` tokens)."""
    hits = 0
    for history, answer in docs:
        context = history if window is None else history[-window:]
        ids = torch.tensor([context + answer[:-1]], dtype=torch.long, device=device)  # (1, N + A - 1)
        logits = model(ids)[0, len(context) - 1:]  # (A, V): the logits that predict the answer
        hits += logits.argmax(dim=-1).tolist() == answer
    return hits / len(docs)
