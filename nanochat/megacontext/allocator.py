"""
The Focus Allocator: LensNet's signed scores -> a few legal expand / collapse edits of the WC.

LensNet gives one score per WC entry, > 0 "look closer", < 0 "summarize". One allocator step:
  1. candidates (rebuilt after every edit: list indices shift, so nodes are named by level/start)
     expand:   a gist entry (level >= 1) with score > tau_expand, and only while cost + 31 <= w_max
               (an expand always costs K - 1 = 31 slots: 1 gist -> 32 slots of detail)
     collapse: an LOD0 full block -> its LOD1 gist, or a whole group of 32 sibling gists -> their
               parent (WorkingContext.collapse_range, which also asks the tree that the parent
               exists), scored by the mean of its members' scores, kept when that mean is below
               -tau_collapse and the parent ends before the newest recent_tokens tokens
               (recent protection); a collapse refunds 31 slots
     Only the entries of the WC given to step() carry scores: what an edit creates waits for the
     next scoring, so one step never undoes its own edits.
  2. choice: by |score|. greedy takes the largest (ties: the oldest entry first); stochastic
     samples one of the top_k with probabilities softmax(|score| / temperature), drawing from the
     torch.Generator given (a seeded generator makes it deterministic).
  3. kinds alternate, collapse first, so a collapse's refund can pay for the next expand; when
     one kind has no candidate the other goes on. At most n_diff edits; stop when neither has one.
The WC is checked (check_working_context: tiling, alignment, existence, budget, recent
protection) on the way in and after every edit; check=False skips that, for benchmarks.

Several memories (composite.py: Core-Knowledge memories, then the session): one step ranks the
candidates of every memory together. Recent protection is the session's only; an expansion in
memory m ranks by s - diversity * cost_m / w_max (a memory that already holds much of the budget
must be more useful to get more) and must pass tau_expand so; a CK expansion that would pass the
CK cap (working_context.ck_cap: the session keeps min_session_share) is not a candidate.

Cooldown, the allocator's only state: every edit toggles one node, the parent side of the edit
(a collapse makes node P present, expanding P opens it again; for LOD0 <-> LOD1, P is the LOD1
gist). The allocator remembers, per node (memory, level, start), the step that last toggled it, and
refuses to toggle it again for the next `cooldown` steps: edited at step t, refused at steps
t+1 .. t+cooldown, allowed from t+cooldown+1. So a collapsed group is not re-expanded (and an
expanded gist not re-collapsed) right away. Further edits in the same direction (collapsing P's
group into P's parent, expanding P's children) are not held back. Use one allocator per WC
stream; reset() forgets the history (e.g. when a new document starts).
"""

from collections import namedtuple

import torch

from nanochat.megacontext import BLOCK_SIZE
from nanochat.megacontext.horizon import score_entries
from nanochat.megacontext.working_context import check_working_context, ck_cap

K = BLOCK_SIZE

# one edit, for telemetry (swap rate = edits per step): kind "expand" or "collapse";
# before / after: tuples of Entry (expand: (gist,) -> its children; collapse: members -> (parent,))
Edit = namedtuple("Edit", ["kind", "before", "after"])


def alternate(n_diff, candidates, make_edit):
    """The loop of one allocator step (FocusAllocator.step): at most n_diff
    edits, kinds alternating, collapse first, and when one kind has no candidate the other goes on;
    stop when neither has one. candidates(kind) -> a list (of the WC as it is now); make_edit(kind,
    that list) chooses one, applies and checks it -> the edit. -> the list of edits made."""
    edits, order = [], ("collapse", "expand")
    while len(edits) < n_diff:
        for kind in order:
            found = candidates(kind)
            if found:
                break
        else:
            break  # no candidate of either kind
        edits.append(make_edit(kind, found))
        order = ("expand", "collapse") if kind == "collapse" else ("collapse", "expand")
    return edits


class FocusAllocator:
    def __init__(self, w_max, tau_expand=0.1, tau_collapse=0.1, n_diff=4, cooldown=2, strategy="greedy",
                 temperature=1.0, recent_tokens=0, top_k=4, check=True, min_session_share=0.5, diversity=0.1):
        if strategy not in ("greedy", "stochastic"):
            raise ValueError(f"strategy must be 'greedy' or 'stochastic', got {strategy!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if n_diff < 0 or cooldown < 0 or recent_tokens < 0 or top_k < 1:
            raise ValueError(f"need n_diff, cooldown, recent_tokens >= 0 and top_k >= 1 (got {n_diff}, {cooldown}, {recent_tokens}, {top_k})")
        self.w_max = w_max
        self.tau_expand = tau_expand
        self.tau_collapse = tau_collapse
        self.n_diff = n_diff
        self.cooldown = cooldown
        self.strategy = strategy
        self.temperature = temperature
        self.recent_tokens = recent_tokens
        self.top_k = top_k  # stochastic: how many of the best candidates of a kind may be drawn
        self.check = check
        self.min_session_share, self.diversity = min_session_share, diversity  # several memories only
        self.steps = 0  # step() calls so far
        self.last_toggled = {}  # (memory, level, start) of a node -> the step that last expanded or collapsed it

    @classmethod
    def from_config(cls, config, w_max=None, cooldown=None, check=True):
        """The allocator a MegaContextConfig describes; w_max / cooldown override its own (training
        refocuses under the annealed variant budget C2, with no cooldown: each slate starts afresh)."""
        return cls(config.w_max if w_max is None else w_max, config.tau_expand, config.tau_collapse, config.n_diff,
                   config.cooldown if cooldown is None else cooldown, config.allocator, config.temperature,
                   config.recent_tokens, config.top_k, check=check, min_session_share=config.ck_min_session_share,
                   diversity=config.ck_diversity)

    def reset(self):
        self.steps = 0
        self.last_toggled = {}

    def step(self, wc, scores, source, generator=None):
        """wc: WorkingContext; scores: (E,) one signed score per entry; source: the tree (or the
        CompositeSource of wc's memories). -> (new WorkingContext, list of Edit). A step with no
        candidate returns wc itself."""
        scores = self.validate_scores(wc, scores)
        if self.check:
            check_working_context(wc, source, self.w_max, self.recent_tokens, self.min_session_share)
        self.begin_step()
        score_of = dict(zip(wc.entries, scores))  # Entry -> score; entries made by this step's edits have none
        cap = ck_cap(source, self.w_max, self.min_session_share, self.recent_tokens)

        def candidates(kind):
            return self.collapses(wc, source, score_of) if kind == "collapse" else self.expands(wc, source, score_of, cap)

        def make_edit(kind, found):
            nonlocal wc
            _, i, node = self.choose(found, generator)
            wc, edit = self.apply(wc, kind, i, node, source)
            if self.check:
                check_working_context(wc, source, self.w_max, self.recent_tokens, self.min_session_share)
            return edit

        edits = alternate(self.n_diff, candidates, make_edit)
        return wc, edits

    def begin_step(self):
        """Count a step and forget the toggles whose cooldown is over."""
        self.steps += 1
        self.last_toggled = {node: t for node, t in self.last_toggled.items() if self.steps - t <= self.cooldown}

    def apply(self, wc, kind, i, node, source):
        """Make one chosen edit and start its node's cooldown. -> (new WorkingContext, Edit)."""
        if kind == "collapse":
            j0, j1, _ = wc.collapse_range(i, source)
            new_wc = wc.collapse(i, source)
            edit = Edit("collapse", wc.entries[j0:j1], (node,))
        else:
            new_wc = wc.expand(i)
            edit = Edit("expand", (node,), new_wc.entries[i:i + K if node.level > 1 else i + 1])
        self.last_toggled[(node.memory, node.level, node.start)] = self.steps
        return new_wc, edit

    # -------------------------------------------------------------------------
    # candidates: lists of (score, entry index, node toggled); choose() picks one by |score|

    def validate_scores(self, wc, scores):
        scores = torch.as_tensor(scores)
        if scores.ndim != 1 or scores.shape[0] != len(wc):
            raise ValueError(f"scores has shape {tuple(scores.shape)}, expected ({len(wc)},): one score per working-context entry")
        if not torch.isfinite(scores).all():
            bad = torch.nonzero(~torch.isfinite(scores))[0].item()
            raise ValueError(f"scores must be finite: entry {bad} scored {scores[bad].item()}")
        return scores.detach().double().cpu().tolist()

    def _cooling(self, node):
        t = self.last_toggled.get((node.memory, node.level, node.start))
        return t is not None and self.steps - t <= self.cooldown

    def expands(self, wc, source, score_of, ck_cap=0):
        if wc.cost + K - 1 > self.w_max:
            return []  # every expand costs the same, so none fits
        session = len(source.memories) - 1
        memory_cost = [0] * (session + 1)
        for e in wc.entries:
            memory_cost[e.memory] += e.cost
        ck_full = session > 0 and wc.cost - memory_cost[-1] + K - 1 > ck_cap
        candidates = []
        for i, e in enumerate(wc.entries):
            s = score_of.get(e)
            if e.level < 1 or s is None or (ck_full and e.memory < session):
                continue
            if session > 0:  # the diversity penalty
                s = s - self.diversity * memory_cost[e.memory] / self.w_max
            if s > self.tau_expand and not self._cooling(e):
                candidates.append((s, i, e))
        return candidates

    def collapses(self, wc, source, score_of):
        session = len(source.memories) - 1
        protect_from = source.memories[-1].num_tokens - self.recent_tokens  # no session gist may end after this token
        seen, candidates = set(), []
        for i, e in enumerate(wc.entries):
            s = score_of.get(e)
            if s is None or s >= -self.tau_collapse:
                continue  # a group's mean is below -tau_collapse only if one of its members is
            key = e.parent  # one range lookup per parent node
            if key in seen:
                continue
            seen.add(key)
            r = wc.collapse_range(i, source)
            if r is None:
                continue  # a short tail block, siblings missing from the WC, or a parent not in the tree
            j0, j1, parent = r
            members = [score_of.get(m) for m in wc.entries[j0:j1]]
            if None in members or (parent.memory == session and parent.end > protect_from) or self._cooling(parent):
                continue
            mean = sum(members) / len(members)
            if mean < -self.tau_collapse:
                candidates.append((mean, j0, parent))
        return candidates

    def choose(self, candidates, generator):
        ranked = sorted(candidates, key=lambda c: (-abs(c[0]), c[2].start))
        if self.strategy == "greedy":
            return ranked[0]
        top = ranked[:self.top_k]
        logits = torch.tensor([abs(c[0]) for c in top], dtype=torch.float64) / self.temperature
        k = torch.multinomial(torch.softmax(logits, 0), 1, generator=generator).item()
        return top[k]


# -----------------------------------------------------------------------------
# refocusing: LensNet scores, then allocator steps, until nothing changes

def refocus_batch(model, lensnet, allocators, wcs, sources, iterations, generators=None):
    """Refocus several WCs at once: per iteration one batched LensNet scoring of the WCs still
    moving, then each one's allocator step; a WC stops at its first iteration with no edit.
    -> (wcs, edits): edits[b] is the list of each of WC b's iterations' Edit lists."""
    wcs = list(wcs)
    edits = [[] for _ in wcs]
    active = list(range(len(wcs)))
    device, dtype = model.get_device(), model.transformer.wte.weight.dtype
    for _ in range(iterations):
        if not active:
            break
        assembled = [wcs[b].assemble(sources[b], model.embed_tokens, device, dtype) for b in active]
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
