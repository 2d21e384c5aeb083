"""
Validation of the MegaContext path (design: shared/spec/megacontext.md, "Telemetry and validation";
failure mode 10: an MC run is validated on the MC path, not only by the vanilla bpb).

One sequence S of N tokens splits into the history S[:-H] and the horizon S[-H:]. Every working
context (WC) below covers (part of) the history and is scored by the mean NLL of the horizon's H
true tokens (horizon.horizon_nll), with no grad:
  nll_trunc    WorkingContext.truncated(source, w_max): the newest w_max tokens raw, a truncated window
  nll_full     the whole history raw, no budget: the ceiling. It equals the vanilla forward's NLL on
               S's last H tokens (to float rounding, below positions.SPLIT = 4096 tokens; a history longer
               than the model's sequence_len runs through its sliding windows at positions it was
               never trained on)
  nll_mc       the MegaContext path: WorkingContext.recency_filled(source, w_max, recent_tokens,
               max_level) (everything older as the coarsest gists, the newest tokens raw as far as the
               budget allows; when even the coarsest WC costs more than w_max, its oldest entries are
               dropped until it fits, see `mc_coverage`), then LensNet + FocusAllocator(check=True)
               refocus it for up to refocus_iters steps
  gap_closed   (nll_trunc - nll_mc) / (nll_trunc - nll_full) over the means: 0 = no better than the
               truncated window, 1 = as good as the full history (None when the full history beats
               the window by less than MIN_GAP = 0.01 nats: no gap to close, the ratio would be noise)
  dnll_lod{L}  NLL(coarsest WC with gists up to level L, ignoring w_max) - nll_full: the cost of
               substituting gists for everything older than the recent tokens (GistNet's
               substitutability). Measured only on histories with a whole level-L node outside the
               recent tokens
  gist_cos_lod{L}  horizon.gist_loss's cosine on the full-history forward (LOD2 when H >= 1024)
  budget_violations, wc_util  check_working_context on each final MC WC (must be 0 violations), cost / w_max
  LensNet audit (audit_edits > 0): LensNet scores the final MC WC; its single legal edits are expanding a
               gist (predicted utility +score) and collapsing an LOD0 block or a whole sibling group
               whose parent ends before the recent tokens (predicted utility -mean member score, what
               the allocator ranks by). The audit relaxes the budget to w_max + 31 so that every gist
               may be expanded once even in a full WC. Up to audit_edits of them, spread evenly over
               the utility ranking, are measured: DeltaNLL = NLL(edited WC) - NLL(WC). Reported: the
               sign agreement (utility > 0 <=> DeltaNLL < 0), the Spearman rank correlation of
               utility and -DeltaNLL over every audited edit, and lensnet.lens_agreement's pairwise
               agreement within each WC's audit.
  ans_nll_*    with answer_tokens (long-range documents whose horizon ends with a recalled answer):
               the same NLLs on the answer's tokens alone, and ans_gap_closed
Every forward is batched: the WCs of all sequences go through horizon_nll in chunks of at most
max_slots padded slots, sorted by length so that little is padding.

measure_sequences gives one short record per sequence, summarize turns records into the means
(so a caller can group records, e.g. per document source), evaluate_sequences does both, and
validate is the quick version base_train runs at each eval step. measure_retrieval (the section at
the end) asks a different question: is a fact far back in a long-range document recalled exactly?
"""

import math
import random
import time
import contextlib

import torch

from nanochat.common import UserError, print0
from nanochat.megacontext import BLOCK_SIZE
from nanochat.megacontext.allocator import FocusAllocator, refocus_batch
from nanochat.megacontext.horizon import MAX_SLOTS, build_source, horizon_nlls, score_entries, split_point
from nanochat.megacontext.lensnet import lens_agreement
from nanochat.megacontext.working_context import WorkingContext, WorkingContextError, check_working_context, fit_budget

K = BLOCK_SIZE
# -----------------------------------------------------------------------------
# small pieces


MIN_GAP = 0.01  # nats: below this the full history barely beats truncation and the ratio is noise


def gap_closed(nll_trunc, nll_full, nll_mc):
    """The fraction of the truncation gap the MC path closes; None when there is no gap to close
    (the full history beats the truncated window by less than MIN_GAP nats, or not at all)."""
    denom = nll_trunc - nll_full
    return (nll_trunc - nll_mc) / denom if denom >= MIN_GAP else None


def spearman(x, y):
    """Spearman rank correlation of two equal-length sequences of numbers (ties get their mean
    rank); None with fewer than 3 pairs or when either side is constant."""
    if len(x) != len(y) or len(x) < 3:
        return None

    def ranks(v):
        t = torch.tensor(v, dtype=torch.float64)
        r = torch.empty_like(t)
        r[t.argsort()] = torch.arange(len(v), dtype=torch.float64)
        _, group, counts = torch.unique(t, return_inverse=True, return_counts=True)
        return torch.zeros(len(counts), dtype=torch.float64).index_add_(0, group, r)[group] / counts[group]

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.square().sum() * ry.square().sum()).sqrt()
    return (rx * ry).sum().item() / denom.item() if denom > 0 else None


# -----------------------------------------------------------------------------
# refocusing


def start_working_contexts(cfg, sources, levels):
    """The WC each refocus starts from: WorkingContext.recency_filled up to the source's level, fit_budget'ed."""
    return [fit_budget(WorkingContext.recency_filled(src, cfg.w_max, cfg.recent_tokens, L), cfg.w_max)
            for src, L in zip(sources, levels)]


def mc_working_contexts(model, lensnet, cfg, sources, levels, iterations, seed):
    """The MegaContext WC of each source: WorkingContext.recency_filled up to its level (the newest
    tokens raw as far as w_max allows, the rest as gists; fit_budget when even that is too big), then
    refocused with a fresh allocator and generator (seed + index). -> (wcs, edits) as refocus_batch."""
    start = start_working_contexts(cfg, sources, levels)
    allocators = [FocusAllocator.from_config(cfg) for _ in sources]
    generators = [torch.Generator().manual_seed(seed + b) for b in range(len(sources))]
    return refocus_batch(model, lensnet, allocators, start, sources, iterations, generators)


# -----------------------------------------------------------------------------
# the LensNet audit


def audit_candidates(wc, scores, source, recent_tokens):
    """Every single legal edit of wc: [(predicted utility, edited WC, "expand" or "collapse")]; scores (E,) floats."""
    protect_from = source.num_tokens - recent_tokens
    out, seen = [], set()
    for i, e in enumerate(wc.entries):
        if e.level > 0:
            out.append((scores[i], wc.expand(i), "expand"))
        if e.parent in seen:
            continue
        seen.add(e.parent)
        r = wc.collapse_range(i, source)
        if r is not None and r[2].end <= protect_from:
            j0, j1, _ = r
            out.append((-sum(scores[j0:j1]) / (j1 - j0), wc.collapse(i, source), "collapse"))
    return out


def spread(items, n):
    """Up to n of items, sorted by their first field, evenly spaced (both ends included)."""
    items = sorted(items, key=lambda t: t[0])  # stable: equal utilities keep their order
    if len(items) <= n:
        return items
    if n == 1:
        return [items[-1]]
    return [items[round(k * (len(items) - 1) / (n - 1))] for k in range(n)]


# -----------------------------------------------------------------------------
# measuring and summarizing


@contextlib.contextmanager
def full_windows(model, n):
    """The long (L) layers' attention windows widened to at least n tokens while the block runs, so the
    full-history baseline reads all of it: at their own window (sequence_len) they would make it a sliding
    window past that length, unable to copy a fact older than one window in a single hop. Short (S) layers
    keep their window (local by design); within sequence_len nothing changes."""
    saved = model.window_sizes
    model.window_sizes = [max(w, n) if w == max(saved) else w for w in saved]
    try:
        yield model
    finally:
        model.window_sizes = saved


@torch.no_grad()
def measure_sequences(model, gistnet, lensnet, mc_config, sequences, horizon=None, refocus_iters=8, audit_edits=8,
                      answer_tokens=None, max_slots=MAX_SLOTS, seed=0):
    """sequences: list of (N_i,) long tensors on the model's device -> one record (dict) per sequence:
    nll_trunc, nll_full, nll_mc, dnll_lod{L} (when measured), gist_cos_lod{L}, violations (0/1),
    wc_util, mc_coverage (the fraction of the history the MC WC covers), lod{L}_frac (the MC WC's
    entries per level), swaps (edits of each refocus iteration), audit [(utility, DeltaNLL)],
    audit_agree, audit_pairs. answer_tokens: None or one int per sequence, how many of its last
    tokens are an answer to recall (long-range documents); where > 0 the record also has
    ans_nll_trunc, ans_nll_full, ans_nll_mc: the mean NLL of those tokens alone."""
    cfg = mc_config
    H = cfg.horizon if horizon is None else horizon
    if H < 1 or not sequences:
        raise UserError(f"need at least one sequence and a horizon >= 1 (got {len(sequences)} sequences, horizon {H})")
    short = [i for i, s in enumerate(sequences) if s.ndim != 1 or s.numel() < H + K]
    if short:
        raise UserError(f"sequence {short[0]} has {sequences[short[0]].numel()} tokens; each needs a horizon of {H} "
                        f"plus at least {K} history tokens")
    R = len(sequences)
    answer_tokens = [0] * R if answer_tokens is None else [min(int(a), H) for a in answer_tokens]
    sources = [build_source(model, gistnet, s[:-H], cfg.max_level) for s in sequences]
    horizons = [s[-H:] for s in sequences]
    records = [{} for _ in range(R)]

    def record(b, key, nll):  # nll (H,): the per-token horizon NLL of one WC of sequence b
        records[b][key] = nll.mean().item()
        if answer_tokens[b] > 0 and key in ("nll_trunc", "nll_full", "nll_mc"):
            records[b]["ans_" + key] = nll[-answer_tokens[b]:].mean().item()

    # the full history (and the gist cosine on its logits), then everything else in one batch of forwards
    levels = [L for L in (1, 2) if L <= cfg.max_level and H >= K ** L]
    full = [WorkingContext.recent(src, src.num_tokens + K) for src in sources]
    with full_windows(model, max(src.num_tokens for src in sources) + H):
        nll_full, cos = horizon_nlls(model, full, sources, horizons, max_slots, gistnet, levels)
    for b in range(R):
        record(b, "nll_full", nll_full[b])
        records[b].update({f"gist_cos_lod{L}": cos[L][b] for L in levels})

    jobs = []  # (sequence index, key, WC)
    for b, src in enumerate(sources):
        jobs.append((b, "nll_trunc", WorkingContext.truncated(src, cfg.w_max)))
        for L in range(1, cfg.max_level + 1):
            wc = WorkingContext.coarsest(src, cfg.recent_tokens, max_level=L)
            if any(e.level == L for e in wc.entries):
                jobs.append((b, f"nll_lod{L}", wc))

    # the MC path: the whole history as gists, the newest tokens raw as far as the budget allows, refocused
    mc, edits = mc_working_contexts(model, lensnet, cfg, sources, [cfg.max_level] * R, refocus_iters, seed)
    for b, (wc, src, rec) in enumerate(zip(mc, sources, records)):
        try:
            check_working_context(wc, src, cfg.w_max, cfg.recent_tokens)
            rec["violations"] = 0
        except WorkingContextError:
            rec["violations"] = 1
        rec["wc_util"] = wc.cost / cfg.w_max
        rec["mc_coverage"] = (src.num_tokens - wc.start) / src.num_tokens
        rec.update({f"lod{L}_frac": sum(e.level == L for e in wc.entries) / len(wc) for L in range(cfg.max_level + 1)})
        rec["swaps"] = [len(step) for step in edits[b]]
        jobs.append((b, "nll_mc", wc))

    utilities = [[] for _ in range(R)]  # per sequence, the audited edits' predicted utilities in job order
    kinds = [[] for _ in range(R)]      # and their kinds, expand / collapse
    if audit_edits > 0:
        device, dtype = model.get_device(), model.transformer.wte.weight.dtype
        assembled = [wc.assemble(src, model.embed_tokens, device, dtype) for wc, src in zip(mc, sources)]
        scores, _ = score_entries(lensnet, mc, sources, assembled)  # (R, E)
        for b, (wc, src) in enumerate(zip(mc, sources)):
            candidates = audit_candidates(wc, scores[b, :len(wc)].tolist(), src, cfg.recent_tokens)
            for utility, edited, kind in spread(candidates, audit_edits):
                check_working_context(edited, src, cfg.w_max + K - 1, cfg.recent_tokens)
                utilities[b].append(utility)
                kinds[b].append(kind)
                jobs.append((b, "audit", edited))

    nll, _ = horizon_nlls(model, [j[2] for j in jobs], [sources[j[0]] for j in jobs], [horizons[j[0]] for j in jobs], max_slots)
    audited = [[] for _ in range(R)]
    for (b, key, _), value in zip(jobs, nll):
        if key == "audit":
            audited[b].append(value.mean().item())
        else:
            record(b, key, value)
    for b, rec in enumerate(records):
        for L in range(1, cfg.max_level + 1):
            if f"nll_lod{L}" in rec:
                rec[f"dnll_lod{L}"] = rec.pop(f"nll_lod{L}") - rec["nll_full"]
        delta = [v - rec["nll_mc"] for v in audited[b]]  # DeltaNLL of each audited edit
        rec["audit"] = list(zip(utilities[b], delta))
        rec["audit_kinds"] = kinds[b]
        rec["audit_agree"], rec["audit_pairs"] = 0, 0
        if len(delta) >= 2:
            u, d = torch.tensor([utilities[b]]), torch.tensor([delta])
            rec["audit_agree"], rec["audit_pairs"] = lens_agreement(u, d, torch.ones_like(u, dtype=torch.bool))
    return records


def summarize(records):
    """Records of measure_sequences -> dict of means: n, nll_trunc, nll_full, nll_mc, gap_closed
    (of the means; None when there is no gap to close, see gap_closed), dnll_lod{L} and n_lod{L} (how many sequences
    measured it), gist_cos_lod{L}, budget_violations (a count), wc_util, mc_coverage, lod{L}_frac,
    swap_rate (edits per refocus iteration), refocus_iters (iterations per sequence); with answers:
    n_answer, ans_nll_trunc, ans_nll_full, ans_nll_mc, ans_gap_closed; when audited: audit_edits,
    audit_sign_agree, audit_spearman, audit_pair_agree (None when undefined), and what tells LensNet from a
    constant scorer (expands and collapses pooled, "expand helps, collapse hurts" alone scores well on the
    two above): audit_sign_base, the sign agreement of a constant score (every expand +, every collapse -), and
    audit_spearman_within, the mean of the Spearman correlations within each kind (a constant scorer: None)."""
    n = len(records)
    mean = lambda key, rs=records: sum(r[key] for r in rs) / len(rs)
    out = dict(n=n, nll_trunc=mean("nll_trunc"), nll_full=mean("nll_full"), nll_mc=mean("nll_mc"))
    out["gap_closed"] = gap_closed(out["nll_trunc"], out["nll_full"], out["nll_mc"])
    for key in sorted({k for r in records for k in r if k.startswith("dnll_lod")}):
        values = [r[key] for r in records if key in r]
        out[key] = sum(values) / len(values)
        out["n_" + key[len("dnll_"):]] = len(values)
    for key in sorted({k for r in records for k in r if k.startswith("gist_cos_lod") or k.endswith("_frac")}):
        out[key] = mean(key)
    out["budget_violations"] = sum(r["violations"] for r in records)
    out["wc_util"] = mean("wc_util")
    out["mc_coverage"] = mean("mc_coverage")
    iters = sum(len(r["swaps"]) for r in records)
    out["swap_rate"] = sum(sum(r["swaps"]) for r in records) / iters if iters else 0.0
    out["refocus_iters"] = iters / n
    answered = [r for r in records if "ans_nll_mc" in r]
    if answered:
        out["n_answer"] = len(answered)
        for key in ("ans_nll_trunc", "ans_nll_full", "ans_nll_mc"):
            out[key] = mean(key, answered)
        out["ans_gap_closed"] = gap_closed(out["ans_nll_trunc"], out["ans_nll_full"], out["ans_nll_mc"])
    audit = [a for r in records for a in r["audit"]]
    if audit:
        kinds = [k for r in records for k in r.get("audit_kinds", [None] * len(r["audit"]))]  # parallel to audit
        signed = [(u, d, k) for (u, d), k in zip(audit, kinds) if abs(d) > 1e-6 and u != 0]  # a measured change, a predicted sign
        known = [(d, k) for _, d, k in signed if k is not None]
        pairs = sum(r["audit_pairs"] for r in records)
        out["audit_edits"] = len(audit)
        out["audit_sign_agree"] = sum((u > 0) == (d < 0) for u, d, _ in signed) / len(signed) if signed else None
        out["audit_sign_base"] = sum((k == "expand") == (d < 0) for d, k in known) / len(known) if known else None
        out["audit_spearman"] = spearman([u for u, _ in audit], [-d for _, d in audit])
        by_kind = [[(u, d) for (u, d), kk in zip(audit, kinds) if kk == k] for k in ("expand", "collapse")]
        within = [c for c in (spearman([u for u, _ in edits], [-d for _, d in edits]) for edits in by_kind) if c is not None]
        out["audit_spearman_within"] = sum(within) / len(within) if within else None
        out["audit_pair_agree"] = sum(r["audit_agree"] for r in records) / pairs if pairs else None
    return out


def evaluate_sequences(model, gistnet, lensnet, mc_config, sequences, horizon=None, refocus_iters=8, audit_edits=8,
                       answer_tokens=None, max_slots=MAX_SLOTS, seed=0):
    """The means over sequences (list of (N_i,) long tensors on the model's device): the history of
    each is S[:-H], the scored horizon its last H tokens (H defaults to mc_config.horizon). See
    summarize for the keys and the module docstring for what each measures."""
    return summarize(measure_sequences(model, gistnet, lensnet, mc_config, sequences, horizon, refocus_iters, audit_edits,
                                       answer_tokens, max_slots, seed))


def validate(model, gistnet, lensnet, mc_config, rows, refocus_iters=4, bos_id=None):
    """The quick check base_train runs at each eval: rows (R, T + 1) long from the val loader, each
    cut where training cuts it (horizon.split_point: the horizon ends its longest document; with
    bos_id None, the row's last H tokens); a few refocus iterations, no audit.
    -> flat floats: gap_closed, nll_trunc, nll_full, nll_mc, dnll_lod1 (and dnll_lod2 when
    measured), gist_cos_lod1, budget_violations, wc_util, swap_rate; NaN for what is undefined."""
    H = mc_config.horizon
    sequences = [row[:split_point(row, bos_id, H, mc_config.w_max) + H] for row in rows]
    s = evaluate_sequences(model, gistnet, lensnet, mc_config, sequences, refocus_iters=refocus_iters, audit_edits=0)
    keys = ["gap_closed", "nll_trunc", "nll_full", "nll_mc", "dnll_lod1", "gist_cos_lod1", "budget_violations", "wc_util", "swap_rate"]
    if "dnll_lod2" in s:
        keys.insert(5, "dnll_lod2")
    return {k: float(s[k]) if s.get(k) is not None else math.nan for k in keys}


# -----------------------------------------------------------------------------
# the documents mc_eval measures: val text, long-range documents, retrieval documents

LONGRANGE_KINDS = ("passkey", "kv-recall", "variable")


def val_texts():
    """Every document of the val split, in order."""
    from nanochat.dataset import parquets_iter_batched
    return [t for texts in parquets_iter_batched("val") for t in texts]


def val_documents(tokenizer, texts, num_docs, n_tokens):
    """Up to num_docs token lists of exactly n_tokens: consecutive val documents (BOS + text)
    concatenated, the last one cut; the next list starts with the next document."""
    bos = tokenizer.get_bos_token_id()
    docs, current = [], []
    for i in range(0, len(texts), 64):
        for ids in tokenizer.encode(texts[i:i + 64], prepend=bos):
            current += ids
            if len(current) >= n_tokens:
                docs.append(current[:n_tokens])
                current = []
                if len(docs) == num_docs:
                    return docs
    return docs


def left_pad(tokenizer, texts, ids, n_tokens, rng):
    """ids with the end of random val texts in front of them, to exactly n_tokens."""
    pad = []
    while len(pad) < n_tokens - len(ids):
        pad = tokenizer.encode(texts[rng.randrange(len(texts))]) + pad
    return pad[len(pad) - (n_tokens - len(ids)):] + ids


def longrange_documents(tokenizer, texts, num_docs, n_tokens, horizon, seed):
    """num_docs (token list of exactly n_tokens, answer tokens): BOS + a long-range document, the
    few tokens it falls short of n_tokens taken from the end of a val text in front of it."""
    from nanochat.longrange import make_document
    bos = tokenizer.get_bos_token_id()
    rng = random.Random(seed)
    count = lambda text: len(tokenizer.encode(text)) + 1  # + the BOS
    out = []
    for j in range(num_docs):
        doc = make_document(LONGRANGE_KINDS[j % len(LONGRANGE_KINDS)], rng, texts, n_tokens, count, depth=rng.uniform(0.0, 0.75))
        ids = tokenizer.encode(doc.text, prepend=bos)[:n_tokens]
        answer = len(ids) - len(tokenizer.encode(doc.prompt, prepend=bos))  # the answer's tokens at the end
        if not 0 < answer <= horizon:
            raise UserError(f"a {doc.kind} document's answer ({answer} tokens) does not fit the horizon of {horizon} tokens")
        out.append((left_pad(tokenizer, texts, ids, n_tokens, rng), answer))  # left padding: the end of some val text
    return out


def retrieval_documents(tokenizer, texts, kind, depth, history, num_docs, rng):
    """num_docs (history ids, answer ids) of kind with the fact at depth: BOS + a long-range document
    cut before its answer, left-padded to exactly `history` tokens with the end of a val text."""
    from nanochat.longrange import make_document
    bos = tokenizer.get_bos_token_id()
    count = lambda text: len(tokenizer.encode(text)) + 1  # + the BOS
    out = []
    for _ in range(num_docs):
        doc = make_document(kind, rng, texts, history, count, depth=depth)
        ids, prompt = tokenizer.encode(doc.text, prepend=bos), tokenizer.encode(doc.prompt, prepend=bos)
        if ids[:len(prompt)] != prompt:
            raise UserError(f"a {kind} document's answer {doc.answer!r} does not tokenize apart from its question")
        out.append((left_pad(tokenizer, texts, prompt, history, rng), ids[len(prompt):]))
    return out


def gist_first_quality(model, gistnet, lensnet, predictor, mc, docs, prompt_tokens):
    """Gist-first vs token-first decoding, scored teacher forced: each document's first prompt_tokens go
    into a fresh runtime Session, the rest is scored token by token (Session.score) once without and
    once with the predicted-gist plans in front of each block. -> dict(nll_token_first, nll_gist_first,
    gist_first_delta = gist - token first (< 0: the plans help), docs, scored_tokens)."""
    from nanochat.megacontext.runtime import Session
    nll = {}
    for gist_first in (False, True):
        scores = []
        for ids in docs:
            session = Session.create(model, gistnet, lensnet, mc, predictor=predictor, gist_first=gist_first)
            session.feed(ids[:prompt_tokens])
            scores.append(session.score(ids[prompt_tokens:]))  # (len(ids) - prompt_tokens,)
        nll[gist_first] = torch.cat(scores).mean().item()
    return dict(nll_token_first=nll[False], nll_gist_first=nll[True], gist_first_delta=nll[True] - nll[False],
                docs=len(docs), scored_tokens=sum(len(ids) - prompt_tokens for ids in docs))


CURVE_KEYS = ("nll_trunc", "nll_mc", "nll_full")  # the NLL-vs-history curve's keys


def run_history(model, tokenizer, mc, gistnet, lensnet, predictor, history_mult, num_docs, source="both", refocus_iters=8,
                audit_edits=8, seed=0, gist_first_docs=0, device="cpu"):
    """The default mc_eval run: num_docs documents of history_mult x w_max + H tokens per source (val
    text, long-range documents or both), measure_sequences on them cut to their last mult x w_max
    history tokens for mult = 1, 2, 4, ... history_mult (the LensNet audit at the full length only), and
    with a predictor gist-first vs token-first decoding on gist_first_docs val documents. Progress lines
    as it goes. -> (results {source or "overall": summarize(...)} at the full length, curve: one entry per
    mult, gist_first: gist_first_quality's dict or None)."""
    H, history = mc.horizon, history_mult * mc.w_max
    print0(f"mc_eval: w_max {mc.w_max} | history {history} tokens ({history_mult}x) | horizon {H}")

    texts = val_texts()
    docs, answers, source_of = [], [], []
    if source in ("val", "both"):
        val = val_documents(tokenizer, texts, num_docs, history + H)
        if not val:
            raise UserError(f"the val split has fewer than {history + H} tokens: no document of history + horizon tokens")
        if len(val) < num_docs:
            print0(f"warning: the val split holds only {len(val)} documents of {history + H} tokens")
        docs += val
        answers += [0] * len(val)
        source_of += ["val"] * len(val)
    if source in ("longrange", "both"):
        for ids, answer in longrange_documents(tokenizer, texts, num_docs, history + H, H, seed):
            docs.append(ids)
            answers.append(answer)
            source_of.append("longrange")
    sequences = [torch.tensor(d, dtype=torch.long, device=device) for d in docs]
    print0(f"mc_eval: {len(docs)} documents ({', '.join(f'{source_of.count(s)} {s}' for s in dict.fromkeys(source_of))})")

    def grouped(records):
        out = {s: summarize([r for r, src in zip(records, source_of) if src == s]) for s in dict.fromkeys(source_of)}
        out["overall"] = summarize(records)
        return out

    mults = [m for m in (2 ** k for k in range(history_mult.bit_length())) if m < history_mult] + [history_mult]
    curve = []
    for mult in mults:
        t1 = time.time()
        n = mult * mc.w_max + H
        full_run = mult == history_mult
        records = measure_sequences(model, gistnet, lensnet, mc, [s[-n:] for s in sequences], H, refocus_iters,
                                    audit_edits if full_run else 0, answers, seed=seed)
        results = grouped(records)
        o = results["overall"]
        gap = "n/a" if o["gap_closed"] is None else f"{o['gap_closed']:.3f}"
        print0(f"history {mult * mc.w_max:6d} tokens: nll trunc {o['nll_trunc']:.4f} | mc {o['nll_mc']:.4f} | "
               f"full {o['nll_full']:.4f} | gap closed {gap} | swaps/iter {o['swap_rate']:.2f} | {time.time() - t1:.1f}s")
        curve.append(dict(mult=mult, history_tokens=mult * mc.w_max, **{s: {k: r[k] for k in (*CURVE_KEYS, "gap_closed")}
                                                                    for s, r in results.items()}))
    # MegaPrediction: does decoding with the predicted gist of each block as a plan read the text better?
    gist_first = None
    if predictor is not None and gist_first_docs > 0 and mc.w_max < mc.recent_tokens + 2 * K:
        print0(f"gist-first decoding: skipped, the runtime needs w_max >= recent_tokens + {2 * K} (w_max is {mc.w_max})")
    elif predictor is not None and gist_first_docs > 0:
        t1 = time.time()
        docs = val_documents(tokenizer, texts, gist_first_docs, history + 4 * K)  # history fed, 4 blocks scored
        gist_first = gist_first_quality(model, gistnet, lensnet, predictor.eval(), mc, docs, history)
        print0(f"gist-first decoding: nll {gist_first['nll_gist_first']:.4f} vs token-first {gist_first['nll_token_first']:.4f} "
               f"(delta {gist_first['gist_first_delta']:+.4f}) over {gist_first['scored_tokens']} tokens | {time.time() - t1:.1f}s")
    return results, curve, gist_first
