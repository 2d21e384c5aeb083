"""
Validation of the MegaContext path (design: shared/spec/megacontext.md, "Telemetry and validation";
failure mode 10: an MC run is validated on the MC path, not only by the vanilla bpb).

One sequence S of N tokens splits into the history S[:-H] and the horizon S[-H:]. Every working
context (WC) below covers (part of) the history and is scored by the mean NLL of the horizon's H
true tokens (horizon.horizon_nll), with no grad:
  nll_trunc    WorkingContext.recent(source, w_max): the newest w_max tokens raw, a truncated window
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
  gist_cos_lod{L}  training.gist_loss's cosine on the full-history forward (LOD2 when H >= 1024)
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

import torch

from nanochat.common import UserError
from nanochat.megacontext import BLOCK_SIZE
from nanochat.megacontext.allocator import FocusAllocator
from nanochat.megacontext.gistnet import AnyLevel
from nanochat.megacontext.horizon import SequenceSource, build_source, horizon_nll, score_entries
from nanochat.megacontext.lensnet import lens_agreement
from nanochat.megacontext.probes import digit_probe, fact_block, raw_blocks
from nanochat.megacontext.training import gist_loss, split_point
from nanochat.megacontext.working_context import WorkingContext, WorkingContextError, check_working_context

K = BLOCK_SIZE
MAX_SLOTS = 16384  # padded WC + horizon slots per forward


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


def fit_budget(wc, w_max):
    """wc with its oldest entries dropped until its cost is <= w_max (the WC then starts later)."""
    entries = list(wc.entries)
    cost = wc.cost
    while cost > w_max and len(entries) > 1:
        cost -= entries.pop(0).cost
    return WorkingContext(entries)


def _chunks(lengths, max_slots):
    """Index lists, sorted by length, each padding to at most max_slots (one row at least)."""
    chunk = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if chunk and (len(chunk) + 1) * lengths[i] > max_slots:
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk


def horizon_nlls(model, wcs, sources, horizons, max_slots=MAX_SLOTS, gistnet=None, gist_levels=()):
    """-> (nll, cos): nll a list of R (H,) float CPU tensors, each WC's per-token horizon NLL; cos
    {level: R floats}, the gist cosine (training.gist_loss) of each row's forward, for the levels
    given (needs gistnet). The R forwards go in chunks (_chunks) through horizon_nll."""
    H = horizons[0].numel()
    nll = [None] * len(wcs)
    cos = {level: [0.0] * len(wcs) for level in gist_levels}
    for idx in _chunks([wc.cost + H - 1 for wc in wcs], max_slots):
        out = horizon_nll(model, [wcs[i] for i in idx], [sources[i] for i in idx], [horizons[i] for i in idx],
                          return_logits=bool(gist_levels))
        rows = (out[0] if gist_levels else out).float().cpu()  # (len(idx), H)
        for j, i in enumerate(idx):
            nll[i] = rows[j]
            for level in gist_levels:  # one row at a time, so every row gets its own cosine
                g = gist_loss(model, gistnet, out[1][j:j + 1], horizons[i][None], level)
                cos[level][i] = g[1].item()
    return nll, cos


# -----------------------------------------------------------------------------
# refocusing


def refocus_batch(model, lensnet, allocators, wcs, sources, iterations, generators=None):
    """Refocus several WCs at once: per iteration one batched LensNet scoring of the WCs still
    moving, then each one's allocator step; a WC stops at its first iteration with no edit.
    -> (wcs, edits): edits[b] is the list of each of WC b's iterations' Edit lists."""
    wcs = list(wcs)
    edits = [[] for _ in wcs]
    active = list(range(len(wcs)))
    for _ in range(iterations):
        if not active:
            break
        assembled = [wcs[b].assemble(sources[b], model.embed_tokens) for b in active]
        scores, _ = score_entries(lensnet, [wcs[b] for b in active], [sources[b] for b in active], assembled)  # (A, E)
        still = []
        for j, b in enumerate(active):
            gen = None if generators is None else generators[b]
            wcs[b], step_edits = allocators[b].step(wcs[b], scores[j, :len(wcs[b])], sources[b], generator=gen)
            edits[b].append(step_edits)
            if step_edits:
                still.append(b)
        active = still
    return wcs, edits


def refocus(model, lensnet, allocator, wc, source, iterations, generator=None):
    """Repeat LensNet scoring + allocator.step until an iteration makes no edit or `iterations`
    are done. -> (wc, edits per iteration: a list of Edit lists)."""
    wcs, edits = refocus_batch(model, lensnet, [allocator], [wc], [source], iterations,
                               None if generator is None else [generator])
    return wcs[0], edits[0]


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
    """Every single legal edit of wc: [(predicted utility, edited WC)]; scores (E,) floats."""
    protect_from = source.num_tokens - recent_tokens
    out, seen = [], set()
    for i, e in enumerate(wc.entries):
        if e.level > 0:
            out.append((scores[i], wc.expand(i)))
        if e.parent in seen:
            continue
        seen.add(e.parent)
        r = wc.collapse_range(i, source)
        if r is not None and r[2].end <= protect_from:
            j0, j1, _ = r
            out.append((-sum(scores[j0:j1]) / (j1 - j0), wc.collapse(i, source)))
    return out


def spread(items, n):
    """Up to n of items, sorted by their first field, evenly spaced (both ends included)."""
    items = sorted(items, key=lambda t: t[0])
    if len(items) <= n:
        return items
    if n == 1:
        return [items[-1]]
    return [items[round(k * (len(items) - 1) / (n - 1))] for k in range(n)]


# -----------------------------------------------------------------------------
# measuring and summarizing


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
    nll_full, cos = horizon_nlls(model, full, sources, horizons, max_slots, gistnet, levels)
    for b in range(R):
        record(b, "nll_full", nll_full[b])
        records[b].update({f"gist_cos_lod{L}": cos[L][b] for L in levels})

    jobs = []  # (sequence index, key, WC)
    for b, src in enumerate(sources):
        jobs.append((b, "nll_trunc", WorkingContext.recent(src, cfg.w_max)))
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
    if audit_edits > 0:
        assembled = [wc.assemble(src, model.embed_tokens) for wc, src in zip(mc, sources)]
        scores, _ = score_entries(lensnet, mc, sources, assembled)  # (R, E)
        for b, (wc, src) in enumerate(zip(mc, sources)):
            candidates = audit_candidates(wc, scores[b, :len(wc)].tolist(), src, cfg.recent_tokens)
            for utility, edited in spread(candidates, audit_edits):
                check_working_context(edited, src, cfg.w_max + K - 1, cfg.recent_tokens)
                utilities[b].append(utility)
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
    audit_sign_agree, audit_spearman, audit_pair_agree (None when undefined)."""
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
        signed = [(u, d) for u, d in audit if abs(d) > 1e-6 and u != 0]  # a measured change, a predicted sign
        pairs = sum(r["audit_pairs"] for r in records)
        out["audit_edits"] = len(audit)
        out["audit_sign_agree"] = sum((u > 0) == (d < 0) for u, d in signed) / len(signed) if signed else None
        out["audit_spearman"] = spearman([u for u, _ in audit], [-d for _, d in audit])
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
    cut where training cuts it (training.split_point: the horizon ends its longest document; with
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
# retrieval (scripts/mc_eval.py --task): is a fact from far back recalled exactly?
#
# A long-range document (nanochat/longrange.py) is cut into its history (filler, the fact at some
# depth, filler, the question) and its answer's A tokens. Each method below reads the history and
# is scored teacher forced over the answer span (horizon_nll with the answer as the horizon): the
# document is retrieved when greedy argmax predicts every answer token; its nll is the mean over them.
#   megacontext  the history's tree up to the shallowest level >= mc_config.max_level whose coarsest
#                WC fits w_max (gistnet.AnyLevel serves the levels past the trained depth, see
#                fitted_source), WorkingContext.recency_filled, then LensNet + FocusAllocator refocus
#                it, as measure_sequences does
#   truncation   the newest w_max tokens raw (WorkingContext.recent)
#   full         the whole history raw, only when history + answer fit the model's rotary table
#                (model.cos.size(1), what a vanilla forward may read), else None. Only its newest
#                receptive_field(model) tokens (whole blocks) are fed: nothing older can reach the answer
#                through the windowed layers (the logits are the same), and the forward's cost stops
#                growing with the history there. Note that a history longer than that field is "full"
#                in name only: the model itself cannot recall a fact older than it.

METHODS = ("megacontext", "truncation", "full")


def receptive_field(model):
    """How many of the newest history tokens the logits after it can depend on: each layer reads
    `window` slots back (gpt.attend: 0 <= i - j <= window), the smear one more, plus the last itself."""
    return sum(model.window_sizes) + 2


def fitted_source(model, gistnet, history, w_max, recent_tokens, min_level):
    """history (N,) long -> (SequenceSource, level): its tree up to the shallowest level >= min_level
    whose coarsest WC costs <= w_max (gists by gistnet.AnyLevel, so past the trained depth the deepest
    trained level's weights), or up to the deepest level the history has when none fits (fit_budget
    then drops the oldest entries)."""
    depth = min_level
    while K ** (depth + 1) <= history.numel():
        depth += 1
    full = build_source(model, AnyLevel(gistnet), history, depth)
    level = next((L for L in range(min_level, depth + 1) if WorkingContext.coarsest(full, recent_tokens, L).cost <= w_max), depth)
    return SequenceSource(history, full.levels[:level + 1]), level


def answer_scores(model, wcs, sources, answers, max_slots=MAX_SLOTS):
    """-> one (correct, nll) per WC: whether greedy argmax predicts every token of its answer ((A,) long,
    teacher forced after the WC) and the answer's mean NLL. Answers of one length share forwards
    (horizon_nll needs one H), in chunks of at most max_slots padded slots (_chunks)."""
    out = [None] * len(wcs)
    for A in sorted({a.numel() for a in answers}):
        group = [i for i, a in enumerate(answers) if a.numel() == A]
        for idx in _chunks([wcs[i].cost + A - 1 for i in group], max_slots):
            rows = [group[j] for j in idx]
            targets = torch.stack([answers[i] for i in rows])  # (B, A)
            nll, logits, _ = horizon_nll(model, [wcs[i] for i in rows], [sources[i] for i in rows], list(targets),
                                         return_logits=True)  # (B, A), (B, A, V)
            hit = (logits.argmax(dim=-1) == targets).all(dim=-1).tolist()  # (B,)
            for j, i in enumerate(rows):
                out[i] = (hit[j], nll[j].mean().item())
    return out


@torch.no_grad()
def measure_retrieval(model, gistnet, lensnet, mc_config, histories, answers, refocus_iters=8, max_slots=MAX_SLOTS, seed=0):
    """histories: R (N_i,) long tensors on the model's device, each ending with its question; answers:
    R (A_i,) long tensors, the answer tokens that follow. -> (records, levels): records {method: R
    dicts (correct, nll)}, None for full where N_i + A_i exceeds the rotary table; levels: the gist
    level of each MegaContext tree (fitted_source)."""
    cfg = mc_config
    R = len(histories)
    fitted = [fitted_source(model, gistnet, h, cfg.w_max, cfg.recent_tokens, cfg.max_level) for h in histories]
    sources = [src for src, _ in fitted]
    mc, edits = mc_working_contexts(model, lensnet, cfg, sources, [L for _, L in fitted], refocus_iters, seed)
    start = start_working_contexts(cfg, sources, [L for _, L in fitted])  # before any refocus (WCs are values: still as built)
    field = receptive_field(model)
    jobs = []  # (sequence index, method, WC)
    for b, src in enumerate(sources):
        jobs += [(b, "megacontext", mc[b]), (b, "truncation", WorkingContext.recent(src, cfg.w_max))]
        if src.num_tokens + answers[b].numel() <= model.cos.size(1):
            jobs.append((b, "full", WorkingContext.recent(src, min(src.num_tokens, field) + K)))  # covers > field tokens
    scores = answer_scores(model, [j[2] for j in jobs], [sources[j[0]] for j in jobs], [answers[j[0]] for j in jobs], max_slots)
    records = {method: [None] * R for method in METHODS}
    for (b, method, wc), (correct, nll) in zip(jobs, scores):
        records[method][b] = dict(correct=correct, nll=nll)
        if method == "megacontext":  # the probes: is the fact raw in the refocused WC, was it before, how many edits
            block = fact_block(histories[b], answers[b])
            records[method][b].update(fact_raw=None if block is None else block in raw_blocks(wc),
                                      fact_raw_start=None if block is None else block in raw_blocks(start[b]),
                                      swaps=sum(len(step) for step in edits[b]))
    return records, [L for _, L in fitted]


def retrieval_summary(records):
    """A cell of records (dicts of measure_retrieval) -> dict(acc, nll, n): the fraction retrieved and
    the mean answer NLL; None when a record is None (the method did not run)."""
    if not records or any(r is None for r in records):
        return None
    n = len(records)
    out = dict(acc=sum(r["correct"] for r in records) / n, nll=sum(r["nll"] for r in records) / n, n=n)
    for key in ("fact_raw", "fact_raw_start"):  # megacontext: the fraction whose fact block the WC held raw (before refocus)
        found = [r[key] for r in records if r.get(key) is not None]
        if found:
            out[key] = sum(found) / len(found)
    if "swaps" in records[0]:
        out["swaps"] = sum(r["swaps"] for r in records) / n  # refocus edits per WC
    return out


@torch.no_grad()
def gist_digit_probe(model, gistnet, histories, answers, values):
    """Does the fact block's gist carry the answer? histories/answers as measure_retrieval takes them,
    values: each answer's digits as a string (the same length). -> {"gist": per-digit held-out accuracy
    of a linear probe (probes.digit_probe) from the fact block's LOD1 gist, "mean": the same from the
    block's mean normalized token embedding (what a plain mean pool keeps), "n": documents used};
    chance is 0.1 per digit."""
    from nanochat.gpt import norm
    gists, means, kept = [], [], []
    for history, answer, value in zip(histories, answers, values):
        block = fact_block(history, answer)
        if block is None or (block + 1) * K > history.numel():
            continue
        source = build_source(model, gistnet, history[:(block + 1) * K], 1)
        gists.append(source.levels[1][block].float())
        means.append(norm(model.embed_tokens(history[block * K:(block + 1) * K]).float()).mean(dim=0))
        kept.append(value)
    if len(kept) < 4:
        return {"gist": None, "mean": None, "n": len(kept)}
    return {"gist": digit_probe(torch.stack(gists), kept), "mean": digit_probe(torch.stack(means), kept), "n": len(kept)}
