"""
Composite memories: several MegaContexts feeding one working context (the spec's cognitive core).

Memories, in a fixed order: Core-Knowledge (CK) MCs first, trees built once from a corpus
(scripts/mc_build_ck.py) and only read, then the Session MC, the conversation's own tree, last.
Each memory keeps its own block grid, and the composite WC is one WorkingContext segment per
memory, in memory order:
    [ CK_0 segment | CK_1 segment | ... | session segment ]
Every segment is a legal WC over its own memory (working_context.py's invariants; recent
protection for the session only), so each tiles its memory up to the memory's newest token.

Positions: the memories read as if they came one after another before the conversation: token t
of memory m sits at position offsets[m] + t, offsets[m] = the token counts of the memories before
it (CompositeSource.offsets). The session's newest token is the composite's last position and a
horizon continues after it.

Budget (check_composite): the total cost is <= w_max, and the session is guaranteed its share:
the CK segments together cost at most
    ck_cap = w_max - max(min(ceil(min_session_share * w_max), session tokens), session floor)
where the floor is the cost of the session's coarsest legal WC (its recent tokens raw, the rest as
gists), so the session can always be tiled whole (unless w_max is too small for even that: the CKs
keep a slot each and the session's oldest entries go, as without memories). A short session lends its unused share to the
CKs, and as it grows the CKs give it back (runtime.make_room_composite shrinks them first).

Duck typing: CompositeSource and CompositeWC offer what the shared code reads from a source and a
WorkingContext (horizon.pack_horizon / horizon_nll, horizon.score_entries, allocator.refocus):
entries (every segment's entries in slot order), cost, start (0), len(), assemble(source,
embed_tokens), and num_tokens / num_gists / gists (LensNet's tail gists: the session's newest).

CompositeAllocator: one FocusAllocator step over all segments: kinds alternate (collapse first), at
most n_diff edits, and the candidates of every memory are ranked together by |score|, where an
expansion in memory m is scored
    s - diversity * cost_m / w_max
(the diversity penalty: a memory that already holds much of the budget must be more useful to get
more). An expansion that would pass w_max, or for a CK the CK cap, is not a candidate. Cooldowns
are kept per memory.
"""

import math

import torch

from nanochat.megacontext import BLOCK_SIZE
from nanochat.megacontext.allocator import FocusAllocator, alternate
from nanochat.megacontext.working_context import WorkingContext, WorkingContextError, check_working_context, fit_budget

K = BLOCK_SIZE


class CompositeSource:
    """The memories of one composite WC: CK sources then the session's (each a tree or a SequenceSource)."""

    def __init__(self, memories, names=None):
        if not memories:
            raise ValueError("a composite needs at least the session memory")
        self.memories = list(memories)
        self.names = list(names) if names is not None else [f"ck{m}" for m in range(len(memories) - 1)] + ["session"]
        self.offsets = [0]
        for src in self.memories[:-1]:
            self.offsets.append(self.offsets[-1] + src.num_tokens)

    @property
    def session(self):
        return self.memories[-1]

    @property
    def num_tokens(self):
        """The position after the session's newest token (where a horizon starts)."""
        return self.offsets[-1] + self.session.num_tokens

    def num_gists(self, level):
        return self.session.num_gists(level)

    def gists(self, level, i0, i1):
        return self.session.gists(level, i0, i1)


class CompositeWC:
    """One WorkingContext segment per memory of a CompositeSource, in the same order. Immutable."""

    def __init__(self, segments):
        self.segments = tuple(segments)
        self.entries = tuple(e for seg in self.segments for e in seg.entries)
        self.cost = sum(seg.cost for seg in self.segments)
        self.start = 0  # positions are composite ones (CompositeSource.offsets): they start at 0

    def __eq__(self, other):
        return isinstance(other, CompositeWC) and self.segments == other.segments

    def __hash__(self):
        return hash(self.segments)

    def __len__(self):
        return len(self.entries)

    def __repr__(self):
        return "CompositeWC(" + " | ".join(repr(seg) for seg in self.segments) + ")"

    @property
    def ck_cost(self):
        return sum(seg.cost for seg in self.segments[:-1])

    def replace(self, m, segment):
        return CompositeWC(self.segments[:m] + (segment,) + self.segments[m + 1:])

    def assemble(self, source, embed_tokens=None, device=None, dtype=None):
        """WorkingContext.assemble over every segment, concatenated: positions are composite (memory
        m's token t at source.offsets[m] + t), entry indices count across segments."""
        parts, first_entry = [], 0
        for seg, src, offset in zip(self.segments, source.memories, source.offsets):
            a = seg.assemble(src, embed_tokens, device, dtype)
            a["positions"] = a["positions"] + (offset + seg.start)  # WorkingContext.assemble: relative to seg.start
            a["entry"] = a["entry"] + first_entry
            parts.append(a)
            first_entry += len(seg)
        return {key: torch.cat([a[key] for a in parts]) for key in parts[0]}


def ingest_documents(tree, tokenizer, texts, progress=None):
    """Build a Core-Knowledge memory: each text into the tree as <|bos|> + its tokens, then <|bos|> to
    the end of the last block (so every token has an LOD1 gist and no raw tail costs slots).
    progress(k, tree) after each text. -> [(start, end)] token range of each text, <|bos|> included."""
    bos = tokenizer.get_bos_token_id()
    spans = []
    for k, text in enumerate(texts):
        start = tree.num_tokens
        tree.ingest(tokenizer.encode(text, prepend=bos))
        spans.append((start, tree.num_tokens))
        if progress is not None:
            progress(k, tree)
    tree.ingest([bos] * (-tree.num_tokens % K))
    return spans


def ck_cap(source, w_max, min_session_share, recent_tokens):
    """The most slots the CK segments of source (a CompositeSource) may hold together: the session keeps
    its share (or all it has, if less), and never less than its coarsest legal WC, unless even that
    leaves the CKs less than a slot each (a budget too small for the history: the session then loses
    its oldest entries, as a lone session would, working_context.fit_budget)."""
    session = source.session
    floor = WorkingContext.coarsest(session, recent_tokens).cost if session.num_tokens else 0
    return max(len(source.memories) - 1, w_max - max(min(math.ceil(min_session_share * w_max), session.num_tokens), floor))


def check_composite(cwc, source, w_max, recent_tokens, min_session_share):
    """Raise WorkingContextError naming the first broken invariant (per segment, then the budget
    and the session's share); return cwc when legal."""
    if len(cwc.segments) != len(source.memories):
        raise WorkingContextError(f"{len(cwc.segments)} segments for {len(source.memories)} memories")
    for m, (seg, src) in enumerate(zip(cwc.segments, source.memories)):
        try:
            check_working_context(seg, src, w_max, recent_tokens if m == len(source.memories) - 1 else 0)
        except WorkingContextError as e:
            raise WorkingContextError(f"memory {source.names[m]}: {e}") from None
    if cwc.cost > w_max:
        raise WorkingContextError(f"budget: the composite costs {cwc.cost} > w_max {w_max}")
    cap = ck_cap(source, w_max, min_session_share, recent_tokens)
    if cwc.ck_cost > cap:
        raise WorkingContextError(f"session share: the CK segments cost {cwc.ck_cost} > {cap} "
                                  f"(w_max {w_max} less the session's share {min_session_share:g})")
    return cwc


def composite_start(source, w_max, recent_tokens, min_session_share):
    """The starting composite WC: each CK at its coarsest, the session WorkingContext.recency_filled
    in its reserved share (w_max - ck_cap); what is left is free for LensNet to spend on whichever
    memory needs detail. A CK whose coarsest view passes its part of the cap keeps only its newest
    entries (fit_budget); its part: an even split of what the CKs before it left."""
    cap = ck_cap(source, w_max, min_session_share, recent_tokens)
    cks, left = [], cap
    for k, src in enumerate(source.memories[:-1]):  # water-filling: each CK its coarsest view, within an even share of what is left
        cks.append(fit_budget(WorkingContext.coarsest(src), max(1, left // (len(source.memories) - 1 - k))))
        left -= cks[-1].cost
    session = WorkingContext.recency_filled(source.session, w_max - cap, recent_tokens)
    return CompositeWC(cks + [session])


class CompositeAllocator:
    """The Focus Allocator of a composite WC (see the top): one FocusAllocator per memory for its
    candidates and cooldowns, one ranking over all of them."""

    def __init__(self, allocators, w_max, min_session_share=0.5, diversity=0.1, check=True, recent_tokens=0):
        self.allocators = list(allocators)  # one per memory, session last
        self.w_max, self.min_session_share, self.diversity = w_max, min_session_share, diversity
        self.check, self.recent_tokens = check, recent_tokens
        self.n_diff = self.allocators[-1].n_diff

    @classmethod
    def from_config(cls, config, num_memories, w_max=None, cooldown=None, check=True):
        w_max = config.w_max if w_max is None else w_max
        allocators = [FocusAllocator.from_config(config, w_max=w_max, cooldown=cooldown, check=False) for _ in range(num_memories)]
        for a in allocators[:-1]:
            a.recent_tokens = 0  # a CK has no recent tokens to protect
        return cls(allocators, w_max, config.ck_min_session_share, config.ck_diversity, check, config.recent_tokens)

    def step(self, cwc, scores, source, generator=None):
        """cwc: CompositeWC; scores: (E,) one signed score per entry (slot order) -> (new CompositeWC,
        list of (memory index, Edit))."""
        scores = self.allocators[-1].validate_scores(cwc, scores)
        if self.check:
            check_composite(cwc, source, self.w_max, self.recent_tokens, self.min_session_share)
        for a in self.allocators:
            a.begin_step()
        score_of, i = [], 0  # per memory: Entry -> score (entries made by this step's edits have none)
        for seg in cwc.segments:
            score_of.append(dict(zip(seg.entries, scores[i:i + len(seg)])))
            i += len(seg)
        cap = ck_cap(source, self.w_max, self.min_session_share, self.recent_tokens)

        def make_edit(kind, found):
            nonlocal cwc
            ranked = [(s, (m, j), node) for s, m, j, node in found]  # FocusAllocator.choose's (score, index, node)
            _, (m, j), node = self.allocators[-1].choose(ranked, generator)
            segment, edit = self.allocators[m].apply(cwc.segments[m], kind, j, node, source.memories[m])
            cwc = cwc.replace(m, segment)
            if self.check:
                check_composite(cwc, source, self.w_max, self.recent_tokens, self.min_session_share)
            return m, edit

        edits = alternate(self.n_diff, lambda kind: self.candidates(cwc, source, score_of, kind, cap), make_edit)
        return cwc, edits

    def candidates(self, cwc, source, score_of, kind, cap):
        """[(ranking score, memory, entry index in its segment, node)] of one kind over every memory."""
        out, last = [], len(cwc.segments) - 1
        for m, (seg, src, alloc) in enumerate(zip(cwc.segments, source.memories, self.allocators)):
            if kind == "collapse":
                out += [(s, m, j, node) for s, j, node in alloc.collapses(seg, src, score_of[m])]
                continue
            if cwc.cost + K - 1 > self.w_max or (m < last and cwc.ck_cost + K - 1 > cap):
                continue  # an expansion costs K - 1 slots
            penalty = self.diversity * seg.cost / self.w_max
            out += [(s - penalty, m, j, node) for s, j, node in alloc.expands(seg, score_of[m]) if s - penalty > alloc.tau_expand]
        return out


def attribution(cwc, source, edits=()):
    """Per memory, what it holds of the WC: {name: dict(slots, share (of the WC's cost), entries,
    lod {level: entries}, covered (tokens of the memory the segment tiles), tokens, edits)}."""
    out = {}
    for m, (seg, name, src) in enumerate(zip(cwc.segments, source.names, source.memories)):
        lod = {}
        for e in seg.entries:
            lod[e.level] = lod.get(e.level, 0) + 1
        out[name] = dict(slots=seg.cost, share=seg.cost / max(1, cwc.cost), entries=len(seg),
                         lod={f"lod{L}": c for L, c in sorted(lod.items())}, covered=seg.end - seg.start,
                         tokens=src.num_tokens, edits=sum(1 for mm, _ in edits if mm == m))
    return out
