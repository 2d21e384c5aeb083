"""
The slate of working-context variants MegaContextTrainer scores (training.py, step 2 of its docstring),
and what it logs about them.

- Variant: one WC of one row and what kind it is (baseline | reference | perturbed | lens | drop)
- variant_budget: C2, annealed from the history length down to w_max
- baseline / reference: a row's truncated window and the WC its edits start from
- random_mix / perturb: a random legal mix within the budget, and 1-2 random edits of a reference
  (allocator_edits: the per-entry edit values LensNet's loss reads)
- split_memories: a --cognitive-core row's history as a Core-Knowledge memory and a session
  (composite.py); baseline, reference and perturb take such a two-memory row as they take a lone one
- gist_pair_cos, fact_stats: the collapse detector and the recall probes logged per step
"""

from collections import namedtuple

import torch
import torch.nn.functional as F

from nanochat.megacontext import BLOCK_SIZE
from nanochat.megacontext.composite import CompositeSource, starting_wc
from nanochat.megacontext.horizon import build_sources
from nanochat.megacontext.probes import answer_spans, fact_block, raw_blocks
from nanochat.megacontext.working_context import WorkingContext, ck_cap

K = BLOCK_SIZE


# one WC variant of one row: kind in baseline | reference | perturbed | lens | drop; edits: {Entry of the
# reference: edit value} (None for the baseline and drop, which are not edits of the reference); source:
# what wc reads (None: the row's; a split row's baseline and drop read its session alone)
Variant = namedtuple("Variant", ["row", "kind", "wc", "edits", "source"], defaults=(None,))


def variant_budget(step, num_iterations, history, config):
    """C2 at `step`: linear from the history length (rounded up to whole blocks: every variant is then
    the raw history) down to w_max over the first anneal_frac of the run, in whole blocks; w_max after."""
    ramp = config.anneal_frac * num_iterations
    frac = max(0.0, 1.0 - step / ramp) if ramp > 0 else 0.0
    if frac == 0 or history <= config.w_max:
        return config.w_max
    c2 = config.w_max + frac * (history - config.w_max)
    return max(config.w_max, -(-int(c2) // K) * K)


def random_mix(source, budget, config, rng):
    """The coarsest WC over the whole history, then random expansions while one fits; None when even
    the coarsest WC exceeds the budget."""
    wc = WorkingContext.coarsest(source, config.recent_tokens, config.max_level)
    if wc.cost > budget:
        return None
    while wc.cost + K - 1 <= budget:
        gists = [i for i, e in enumerate(wc.entries) if e.level > 0]
        if not gists:
            break
        wc = wc.expand(rng.choice(gists))
    return wc


def perturb(ref, source, budget, recent_tokens, rng, n_edits):
    """ref plus up to n_edits random legal edits of ref's own entries -> (wc, {ref Entry: edit value}).
    Each round collapses a random group (always when no expansion fits, else half the time), then
    expands a random gist when one fits (a round that collapsed skips it a quarter of the time)."""
    protect_from = source.num_tokens - recent_tokens
    wc, edits, ref_entries = ref, {}, set(ref.entries)

    def untouched(e):
        return e in ref_entries and e not in edits

    for _ in range(n_edits):
        groups = {}  # parent Entry -> (an entry index of the group, the group's members)
        for i, e in enumerate(wc.entries):
            if not untouched(e) or e.parent in groups:
                continue
            r = wc.collapse_range(i, source)
            if r is not None and r[2].end <= protect_from and all(untouched(m) for m in wc.entries[r[0]:r[1]]):
                groups[r[2]] = (i, wc.entries[r[0]:r[1]])
        collapsed = bool(groups) and (wc.cost + K - 1 > budget or rng.random() < 0.5)
        if collapsed:
            i, members = rng.choice(list(groups.values()))
            wc = wc.collapse(i, source)
            edits.update({m: -1.0 / len(members) for m in members})
        expandable = [i for i, e in enumerate(wc.entries) if e.level > 0 and untouched(e)]
        if expandable and wc.cost + K - 1 <= budget and not (collapsed and rng.random() < 0.25):
            i = rng.choice(expandable)
            edits[wc.entries[i]] = 1.0
            wc = wc.expand(i)
    return wc, edits


def allocator_edits(steps):
    """The allocator's Edit list -> {Entry of the WC it was given: edit value}."""
    edits = {}
    for edit in steps:
        if edit.kind == "expand":
            edits[edit.before[0]] = 1.0
        else:
            edits.update({m: -1.0 / len(edit.before) for m in edit.before})
    return edits


def baseline(row, source, budget):
    """Row `row`'s truncated window -> Variant: its newest `budget` tokens raw (WorkingContext.recent);
    for a split row (split_memories), reaching into the CK when the session is shorter, the tokens the
    unsplit history's baseline reads."""
    session = source.memories[-1]
    recent = WorkingContext.recent(session, budget)
    if len(source.memories) == 1:
        return Variant(row, "baseline", recent, None)
    room = budget - recent.cost
    if recent.start > 0 or room < K:
        return Variant(row, "baseline", recent, None, session)
    return Variant(row, "baseline", WorkingContext.joined([WorkingContext.recent(source.memories[0], room), recent]), None)


def reference(source, budget, config, rng, base):
    """The WC a row's edited variants start from, or None (the baseline alone is scored).
    A lone memory: half the rows random_mix, the others WorkingContext.recency_filled (the WC
    inference starts from), kept if it fits and differs from `base` (the baseline's WC). A split row:
    starting_wc (the CK at its coarsest, the session recency-filled in its share), for half the rows
    then random expansions in any memory while one fits; none while the budget holds the whole history."""
    if len(source.memories) == 1:
        ref = random_mix(source, budget, config, rng) if rng.random() < 0.5 else \
            WorkingContext.recency_filled(source, budget, config.recent_tokens, config.max_level)
        return ref if ref is not None and ref.cost <= budget and ref != base else None
    if budget >= source.num_tokens:
        return None
    share = config.ck_min_session_share
    ref = starting_wc(source, budget, config.recent_tokens, share)
    if ref.cost > budget:
        return None  # the coarsest views do not fit this budget: the baseline alone
    cap = ck_cap(source, budget, share, config.recent_tokens)
    session = len(source.memories) - 1
    expand = rng.random() < 0.5
    while expand:
        ck_cost = ref.cost - ref.segment(session).cost
        gists = [i for i, e in enumerate(ref.entries) if e.level > 0
                 and ref.cost + K - 1 <= budget and (e.memory == session or ck_cost + K - 1 <= cap)]
        if not gists:
            break
        ref = ref.expand(rng.choice(gists))
    return ref


def perturb_any(ref, source, budget, config, rng, n_edits):
    """perturb for a lone memory; for a split row, random legal edits of one memory's segment, within
    the budget and, for the CK, its cap -> (wc, {Entry of ref: edit value})."""
    if len(source.memories) == 1:
        return perturb(ref, source, budget, config.recent_tokens, rng, n_edits)
    m = rng.randrange(ref.num_memories)
    session = ref.num_memories - 1
    seg = ref.segment(m)
    room = budget - (ref.cost - seg.cost)
    if m < session:
        ck_cost = ref.cost - ref.segment(session).cost
        room = min(room, ck_cap(source, budget, config.ck_min_session_share, config.recent_tokens) - (ck_cost - seg.cost))
    recent = config.recent_tokens if m == session else 0
    wc, edits = perturb(seg, source.memories[m], max(room, seg.cost), recent, rng, n_edits)
    return ref.replace(m, wc), {e.in_memory(m): v for e, v in edits.items()}


# -----------------------------------------------------------------------------
# cognitive core (--cognitive-core): the history as a Core-Knowledge memory and a session

def split_memories(model, gistnet, history, max_level, rng):
    """history (c,) -> CompositeSource of two memories: the CK, the first a tokens (a whole number of
    blocks, a random cut in the middle half), and the session, the rest. Positions are those of the
    unsplit history (composite.py puts the session right after the CK), so only the WC's structure
    changes: each memory tiled on its own, under the session's share of the budget."""
    c = history.numel()
    a = K * rng.randint(max(1, c // (4 * K)), max(1, 3 * c // (4 * K)))
    return CompositeSource(build_sources(model, gistnet, [history[:a], history[a:]], max_level), ["ck", "session"])


@torch.no_grad()
def gist_pair_cos(sources):
    """Mean cosine between the distinct LOD1 gists of each history (a collapse detector: near 1 means
    GistNet gives every block about the same gist), NaN without two gists."""
    values = []
    for src in sources:
        g = F.normalize(src.levels[1].float(), dim=-1) if src.num_gists(1) >= 2 else None
        if g is not None:
            n = g.size(0)
            values.append(((g @ g.T).sum() - n).item() / (n * (n - 1)))
    return sum(values) / len(values) if values else float("nan")


def fact_stats(rows, cuts, weights, H, variants, refs, lens_rows, scores):
    """Recall rows (scored answers in the horizon): where is each answer's fact? -> {fact_raw_<kind>: the
    fraction of (row, answer) pairs whose fact block a variant of that kind holds raw, fact_lens_top: the
    fraction of references with a fact block as a gist whose top-scored gist is one (NaN: none)}."""
    facts = {}  # row -> the blocks of the facts its horizon asks about
    for b, c in enumerate(cuts):
        spans = answer_spans(weights[b, c - 1:c - 1 + H])
        found = [fact_block(rows[b, :c], rows[b, c + s:c + e]) for s, e in spans]
        facts[b] = [f for f in found if f is not None]
    out = {}
    for kind in ("baseline", "reference", "perturbed", "lens"):
        hits = [f in raw_blocks(v.wc) for v in variants if v.kind == kind for f in facts[v.row]]
        out[f"fact_raw_{kind}"] = sum(hits) / len(hits) if hits else float("nan")
    tops = []
    for j, b in enumerate(lens_rows):
        gists = [(scores[j, i].item(), e.index) for i, e in enumerate(refs[b].entries) if e.level == 1]
        if gists and any(f not in raw_blocks(refs[b]) for f in facts[b]):
            tops.append(max(gists)[1] in facts[b])
    out["fact_lens_top"] = sum(tops) / len(tops) if tops else float("nan")
    return out
