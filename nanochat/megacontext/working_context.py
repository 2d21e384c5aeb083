"""
The Working Context (WC): the fixed-budget sequence the model actually attends to.

A WC is an ordered tuple of entries; each entry is one block of the MegaContext tree at one level:
    Entry(level=0, start, end)   raw tokens [start, end): one LOD0 block, start % K == 0, end - start <= K
    Entry(level=L, start, end)   one level-L gist of tokens [start, start + K**L), start % K**L == 0
Cost: an LOD0 block costs its tokens (32, or fewer for the open tail block), a gist of any level 1.

Invariants (written once here, checked by `check_working_context`, which tests and runtime call):
  1. tiling: entries are contiguous, each starts where the previous ends (no gap, no overlap),
     and the last ends at the newest token of the history;
  2. alignment: every entry starts on its level's block grid and spans exactly one block
     (only the newest LOD0 block may be short: the open tail);
  3. existence: every gist is a complete node the tree has computed;
  4. budget: total cost <= w_max;
  5. recent protection: the newest `recent_tokens` tokens are covered by LOD0 entries.
A WC need not reach back to token 0: it tiles [wc.start, n_tokens). Older history is then
outside it (a truncated baseline); `WorkingContext.coarsest` covers all of it.

Edits, each returning a new WC (a WC is an immutable value, so slates of variants are cheap):
  expand(i):   a level-1 gist -> its LOD0 block; a level-L gist (L >= 2) -> its 32 level-(L-1) children
  collapse(i): an LOD0 block -> its level-1 gist; 32 sibling level-L gists (entry i among them, all
               present in the WC) -> their level-(L+1) parent
Both change the cost by 31 (K - 1), expand up and collapse down; collapse(expand(wc, i)) == wc.

Memories: one WC type reads one memory or several (the cognitive core: Core-Knowledge memories,
then the session, composite.py). Each entry names its memory (Entry.memory, 0 for a lone one);
the entries run memory by memory, in the source's order, and the entries of each memory are a
legal WC over it by the invariants above (recent protection for the last memory, the session,
only). A plain WC is the one-memory case. With several memories the budget also keeps the
session its share (ck_cap). Positions are composite: memory m's token t sits at offsets[m] + t,
as if the memories came one after another (the session last).

The `source` a WC reads: `memories` (the per-memory sources, in order) and `offsets` (the position
of each one's token 0), and per memory num_tokens, num_gists(level), tokens(start, end) -> (n,)
LongTensor, gists(level, i0, i1) -> (i1-i0, D). A one-memory source (MegaContextTree, the in-graph
SequenceSource training builds over one sequence) is its own only memory (OneMemory);
composite.CompositeSource holds several.
"""

import math

from dataclasses import dataclass, field, replace

import torch

from nanochat.megacontext import BLOCK_SIZE

K = BLOCK_SIZE


@dataclass(frozen=True)
class Entry:
    level: int
    start: int
    end: int
    memory: int = field(default=0, repr=False)  # the memory it is a block of (0: the only one)

    @property
    def cost(self):
        return self.end - self.start if self.level == 0 else 1

    @property
    def parent(self):
        """The node one collapse turns this entry into: an LOD0 block's LOD1 gist, a gist's parent."""
        span = K ** (self.level + 1)
        p0 = self.start - self.start % span
        return Entry(self.level + 1, p0, p0 + span, self.memory)

    @property
    def index(self):
        """The node's index within its level (LOD0: the block index)."""
        return self.start // K ** max(self.level, 1)

    def in_memory(self, memory):
        return replace(self, memory=memory)


class OneMemory:
    """A source of one memory (a tree, a SequenceSource) is its own only memory, at position 0."""
    offsets = (0,)

    @property
    def memories(self):
        return (self,)


class HistoryShape(OneMemory):
    """A history of n tokens with every complete gist, its shape alone (no ids, no vectors): enough for
    WorkingContext.coarsest, what the coarsest WC over any history of that length costs."""

    def __init__(self, n_tokens):
        self.num_tokens = n_tokens

    def num_gists(self, level):
        return self.num_tokens // K ** level


class WorkingContextError(ValueError):
    """A WC that breaks one of the invariants above."""


def ck_cap(source, w_max, min_session_share, recent_tokens):
    """The most slots the Core-Knowledge memories of source (all but its last memory) may hold
    together: the session keeps its share (or all it has, if less), and never less than its coarsest
    legal WC, unless even that leaves the CKs less than a slot each (a budget too small for the
    history: the session then loses its oldest entries, as a lone session would, fit_budget).
    0 for a lone memory."""
    if len(source.memories) == 1:
        return 0
    session = source.memories[-1]
    floor = WorkingContext.coarsest(session, recent_tokens).cost if session.num_tokens else 0
    return max(len(source.memories) - 1, w_max - max(min(math.ceil(min_session_share * w_max), session.num_tokens), floor))


def check_working_context(wc, source, w_max, recent_tokens=0, min_session_share=0.0):
    """Raise WorkingContextError naming the first broken invariant; return wc when legal.
    min_session_share: with several memories, the session's share of w_max (ck_cap)."""
    if not wc.entries:
        raise WorkingContextError("empty working context")
    memories = source.memories
    segments = [[] for _ in memories]  # the entries of each memory
    for i, e in enumerate(wc.entries):
        if not 0 <= e.memory < len(memories) or (i > 0 and e.memory < wc.entries[i - 1].memory):
            raise WorkingContextError(f"entry {i} {e} of memory {e.memory}: the entries must run memory by memory, over {len(memories)}")
        segments[e.memory].append(e)
    last = len(memories) - 1
    name = (lambda m: "") if last == 0 else (lambda m: f"memory {source.names[m]}: ")
    for m, entries in enumerate(segments):
        if not entries:
            raise WorkingContextError(f"{name(m)}no entries: {len(memories)} memories, each needs a segment")
    for m, entries in enumerate(segments):
        _check_tiling(entries, memories[m], recent_tokens if m == last else 0, name(m))
    if wc.cost > w_max:
        raise WorkingContextError(f"budget: cost {wc.cost} > w_max {w_max}")
    n = memories[-1].num_tokens
    for i, e in enumerate(segments[-1]):
        if e.level > 0 and e.end > n - recent_tokens:
            raise WorkingContextError(f"{name(last)}recent protection: entry {i} {e} is a gist within the newest {recent_tokens} tokens")
    if last > 0:
        cap, ck_cost = ck_cap(source, w_max, min_session_share, recent_tokens), wc.cost - sum(e.cost for e in segments[-1])
        if ck_cost > cap:
            raise WorkingContextError(f"session share: the CK segments cost {ck_cost} > {cap} "
                                      f"(w_max {w_max} less the session's share {min_session_share:g})")
    return wc


def _check_tiling(entries, source, recent_tokens, name):
    """Tiling, alignment, existence and the recent tokens' cover of one memory's entries."""
    n = source.num_tokens
    if entries[-1].end != n:
        raise WorkingContextError(f"{name}tiling: the last entry ends at {entries[-1].end}, the history at {n}")
    for i, e in enumerate(entries):
        if i > 0 and e.start != entries[i - 1].end:
            kind = "gap" if e.start > entries[i - 1].end else "overlap"
            raise WorkingContextError(f"{name}tiling: {kind} between entry {i - 1} (ends {entries[i - 1].end}) and entry {i} (starts {e.start})")
        span = K ** max(e.level, 1)
        if e.level < 0 or e.start < 0 or e.start % span != 0:
            raise WorkingContextError(f"{name}alignment: entry {i} {e} does not start on the level-{e.level} grid ({span})")
        if e.level == 0 and not (e.start < e.end <= e.start + K and (e.end == e.start + K or e.end == n)):
            raise WorkingContextError(f"{name}alignment: entry {i} {e} is not one LOD0 block (only the newest may be short)")
        if e.level > 0 and e.end != e.start + span:
            raise WorkingContextError(f"{name}alignment: entry {i} {e} does not span one level-{e.level} block ({span} tokens)")
        if e.level > 0 and e.index >= source.num_gists(e.level):
            raise WorkingContextError(f"{name}existence: entry {i} {e}: the tree has {source.num_gists(e.level)} level-{e.level} gists")
    if entries[0].start > max(0, n - recent_tokens):
        raise WorkingContextError(f"{name}recent protection: the WC starts at {entries[0].start}, the newest {recent_tokens} tokens start at {n - recent_tokens}")


class WorkingContext:
    def __init__(self, entries):
        self.entries = tuple(entries)
        self.cost = sum(e.cost for e in self.entries)

    def __eq__(self, other):
        return isinstance(other, WorkingContext) and self.entries == other.entries

    def __hash__(self):
        return hash(self.entries)

    def __len__(self):
        return len(self.entries)

    def __repr__(self):
        if self.num_memories > 1:
            return "WorkingContext(" + " | ".join(repr(seg)[len("WorkingContext("):-1] for seg in self.segments) + ")"
        counts = {}
        for e in self.entries:
            counts[e.level] = counts.get(e.level, 0) + 1
        mix = ", ".join(f"LOD{lvl}: {c}" for lvl, c in sorted(counts.items()))
        return f"WorkingContext([{self.start}, {self.end}), cost {self.cost}, {mix})"

    @property
    def start(self):
        """Where the WC's first memory's entries start (a lone memory: the oldest token it covers)."""
        return self.entries[0].start

    @property
    def end(self):
        return self.entries[-1].end

    def origin(self, source):
        """The composite position of the WC's first slot: assemble's positions count from it."""
        first = self.entries[0]
        return source.offsets[first.memory] + first.start

    # -------------------------------------------------------------------------
    # memories: a WC of several is its segments, one per memory, joined

    @property
    def num_memories(self):
        return self.entries[-1].memory + 1 if self.entries else 0

    def segment(self, m):
        """Memory m's entries as a WC over that memory alone (memory 0)."""
        return WorkingContext(e if e.memory == 0 else e.in_memory(0) for e in self.entries if e.memory == m)

    @property
    def segments(self):
        return [self.segment(m) for m in range(self.num_memories)]

    @classmethod
    def joined(cls, segments):
        """One WC over several memories: segment m (a WC over memory m alone) as memory m's entries."""
        return cls(e.in_memory(m) for m, seg in enumerate(segments) for e in seg.entries)

    def replace(self, m, segment):
        """This WC with memory m's entries those of `segment` (a WC over memory m alone)."""
        segments = self.segments
        segments[m] = segment
        return WorkingContext.joined(segments)

    # -------------------------------------------------------------------------
    # construction

    @classmethod
    def recent(cls, source, w_max):
        """The baseline: the newest whole LOD0 blocks that fit in w_max (a truncated window)."""
        n = source.num_tokens
        assert n > 0 and w_max >= K, "need tokens and room for one block"
        start = (n - 1) // K * K  # the newest block, maybe short
        while start > 0 and n - (start - K) <= w_max:
            start -= K
        return cls(Entry(0, s, min(s + K, n)) for s in range(start, n, K))

    @classmethod
    def truncated(cls, source, w_max):
        """The vanilla baseline the evaluations compare against: exactly the newest min(w_max, n) tokens
        raw, as a model with a w_max-token context reads them (`recent` keeps whole blocks: 97-128 of
        128 tokens). Its oldest entry may start off the block grid (invariant 2), so it is a value to
        assemble and score, not a WC to refocus."""
        n = source.num_tokens
        assert n > 0 and w_max > 0, "need tokens and a budget"
        start = max(0, n - w_max)
        grid = min(n, -(-start // K) * K)  # the first block boundary at or after start
        head = [Entry(0, start, grid)] if grid > start else []
        return cls(head + [Entry(0, s, min(s + K, n)) for s in range(grid, n, K)])

    @classmethod
    def coarsest(cls, source, recent_tokens=0, max_level=None):
        """The cheapest WC over the whole history: the blocks holding the newest recent_tokens at
        LOD0, everything older as the coarsest complete gists (largest aligned level first)."""
        n = source.num_tokens
        lod0_from = max(0, (n - recent_tokens) // K * K)  # blocks ending after n - recent_tokens stay raw
        levels = []
        while source.num_gists(len(levels) + 1) > 0 and (max_level is None or len(levels) < max_level):
            levels.append(len(levels) + 1)
        entries, p = [], 0
        while p < lod0_from:
            level = next((L for L in reversed(levels) if p % K ** L == 0 and p + K ** L <= lod0_from
                          and p // K ** L < source.num_gists(L)), 0)
            end = p + K ** level if level else p + K
            entries.append(Entry(level, p, end))
            p = end
        entries += [Entry(0, s, min(s + K, n)) for s in range(lod0_from, n, K)]
        return cls(entries)

    @classmethod
    def recency_filled(cls, source, w_max, recent_tokens=0, max_level=None):
        """The starting WC of the MegaContext path: the coarsest WC over the whole history, then its
        newest gist expanded again and again while the expansion fits in w_max (a level-L gist opens
        into 32 level-(L-1) ones, a level-1 gist into its raw block). Every token of history is
        reachable, and the rest of the budget holds the newest tokens raw, as a truncated window would.
        Its cost may exceed w_max only when the coarsest WC already does."""
        wc = cls.coarsest(source, recent_tokens, max_level)
        while wc.cost + K - 1 <= w_max:
            gists = [i for i, e in enumerate(wc.entries) if e.level > 0]
            if not gists:
                break
            wc = wc.expand(gists[-1])
        return wc

    def extend(self, source):
        """This WC after the history (its last memory, the session) grew: the newest LOD0 block
        filled up and new LOD0 blocks added up to that memory's num_tokens (streaming). Every existing
        slot keeps its place, so a KV cache over this WC stays valid; the cost grows by the number of
        new tokens."""
        last = self.entries[-1]
        n, m = source.memories[-1].num_tokens, last.memory
        assert n >= self.end, f"the history shrank: the WC ends at {self.end}, the source has {n} tokens"
        entries = list(self.entries)
        if last.level == 0 and last.end - last.start < K:  # the open tail block grows first
            entries[-1] = Entry(0, last.start, min(last.start + K, n), m)
        entries += [Entry(0, s, min(s + K, n), m) for s in range(entries[-1].end, n, K)]
        return WorkingContext(entries)

    # -------------------------------------------------------------------------
    # edits

    def expand(self, i):
        e = self.entries[i]
        if e.level == 0:
            raise WorkingContextError(f"cannot expand entry {i}: it is already raw tokens")
        if e.level == 1:
            children = [Entry(0, e.start, e.end, e.memory)]
        else:
            span = K ** (e.level - 1)
            children = [Entry(e.level - 1, s, s + span, e.memory) for s in range(e.start, e.end, span)]
        return WorkingContext(self.entries[:i] + tuple(children) + self.entries[i + 1:])

    def collapse_range(self, i, source=None):
        """(j0, j1, parent Entry) that collapse(i) would replace entries[j0:j1] with, or None when
        entry i cannot collapse (a short tail block, siblings missing from the WC, or, given the
        tree, a parent gist it has not computed)."""
        e = self.entries[i]
        if e.level == 0:
            r = (i, i + 1, Entry(1, e.start, e.end, e.memory)) if e.end - e.start == K else None
        else:
            r = self._sibling_range(i)
        if r is not None and source is not None and r[2].index >= source.memories[e.memory].num_gists(r[2].level):
            return None
        return r

    def _sibling_range(self, i):
        e = self.entries[i]
        parent = e.parent
        j0 = i - (e.start - parent.start) // K ** e.level  # where the first sibling must sit
        j1 = j0 + K
        if j0 < 0 or j1 > len(self.entries):
            return None
        siblings = self.entries[j0:j1]
        if siblings[0].start != parent.start or any(s.level != e.level or s.memory != e.memory for s in siblings) \
                or siblings[-1].end != parent.end:
            return None
        return j0, j1, parent

    def collapse(self, i, source=None):
        r = self.collapse_range(i, source)
        if r is None:
            raise WorkingContextError(f"cannot collapse entry {i} {self.entries[i]}: not a whole block / sibling group")
        j0, j1, parent = r
        return WorkingContext(self.entries[:j0] + (parent,) + self.entries[j1:])

    # -------------------------------------------------------------------------
    # assembly

    def assemble(self, source, embed_tokens=None, device=None, dtype=None):
        """-> dict of per-slot tensors for the model (T = cost), all on `device`:
        embeds (T, D) in `dtype`: the token embeddings at token slots, the gist vectors elsewhere
        token_ids (T,) long, -1 at gist slots; lod (T,) long; positions (T,) float64: tokens at
        their (composite) index, gists at their span's center, both relative to self.origin(source)
        (float64 keeps x.5 centers and positions past 2**24 exact; positions.py takes them as they are);
        entry (T,) long: the entry each slot belongs to.
        embed_tokens: ids -> embeddings for the token slots (a tree stores ids only), run on `device`
        (default: the CPU), the embeds then in `dtype` (default float32): a model on a GPU or in bf16
        passes its own. None: the source's own source.token_embeds(start, end) (a horizon.SequenceSource:
        the embeddings its gists were built from, in the autograd graph, not embedded again); device /
        dtype then default to the source's. Contiguous runs of same-level entries of one memory are
        fetched with one call each."""
        if embed_tokens is not None:
            device = torch.device("cpu") if device is None else device
            dtype = torch.float32 if dtype is None else dtype
        runs = []  # (memory, level, first entry, last entry + 1)
        for i, e in enumerate(self.entries):
            if runs and runs[-1][:2] == [e.memory, e.level] and runs[-1][3] == i:
                runs[-1][3] = i + 1
            else:
                runs.append([e.memory, e.level, i, i + 1])
        embeds, token_ids, lods, positions, entry_ids = [], [], [], [], []
        for memory, level, i0, i1 in runs:
            src, offset = source.memories[memory], source.offsets[memory]
            a, b = self.entries[i0].start, self.entries[i1 - 1].end
            if level == 0:
                ids = src.tokens(a, b)  # (b - a,)
                embeds.append(src.token_embeds(a, b) if embed_tokens is None else embed_tokens(ids.to(device)))
                token_ids.append(ids)
                positions.append(torch.arange(a, b, dtype=torch.float64) + offset)
                entry_ids.append(torch.repeat_interleave(torch.arange(i0, i1), torch.tensor([self.entries[i].cost for i in range(i0, i1)])))
            else:
                span = K ** level
                embeds.append(src.gists(level, a // span, b // span))  # (i1 - i0, D)
                token_ids.append(torch.full((i1 - i0,), -1, dtype=torch.long))
                positions.append(torch.arange(a, b, span, dtype=torch.float64) + (span - 1) / 2 + offset)
                entry_ids.append(torch.arange(i0, i1))
            lods.append(torch.full((len(token_ids[-1]),), level, dtype=torch.long))
        if device is None:  # as the source holds them
            device = embeds[0].device
        return dict(
            embeds=torch.cat([x.to(device=device, dtype=dtype) for x in embeds]),
            token_ids=torch.cat(token_ids).to(device),
            lod=torch.cat(lods).to(device),
            positions=(torch.cat(positions) - self.origin(source)).to(device if torch.device(device).type != "mps" else "cpu"),  # MPS has no float64
            entry=torch.cat(entry_ids).to(device),
        )


def reachable_history(w_max, recent_tokens, max_level=None):
    """The longest history every length of which, up to it, has a coarsest WC (the blocks holding the
    newest recent_tokens raw, everything older as the largest aligned gists up to max_level) within
    w_max: past it the oldest tokens must leave the WC. The coarsest WC of n tokens costs its raw tail
    (recent_tokens to recent_tokens + K - 1 tokens) plus one gist per unit of the digit sum of m, the
    number of older blocks, in base 32 below the top level and unbounded at it. The first m whose digit
    sum reaches s (the count that breaks the budget) fills q low digits with 31 and puts the rest, r,
    above them: (r + 1) * 32**q - 1, and it breaks at its largest raw tail."""
    s = w_max - (recent_tokens + K - 1) + 1  # the gist count that first breaks the budget
    if s <= 0:
        return min(w_max, recent_tokens + K - 1)
    q = s // (K - 1) if max_level is None else min(s // (K - 1), max_level - 1)
    r = s - q * (K - 1)
    return ((r + 1) * K ** q - 1) * K + recent_tokens + K - 2


MIN_REACH = 4  # an accepted config keeps at least this many times w_max of history whole


def reach_problem(w_max, recent_tokens):
    """None when a session's WC (refocused to w_max - K, leaving a block of room to grow; gists at any
    depth, as a session's tree makes them) keeps at least MIN_REACH x w_max of history whole; otherwise
    the one-line reason, with the smallest w_max that does."""
    reach = reachable_history(w_max - K, recent_tokens)
    if reach >= MIN_REACH * w_max:
        return None
    need = next(w for w in range(w_max, 64 * w_max) if reachable_history(w - K, recent_tokens) >= MIN_REACH * w)
    return (f"w_max {w_max} with recent_tokens {recent_tokens} keeps the whole history reachable only up to "
            f"{reach:,} tokens ({reach / w_max:.1f}x w_max), then drops the oldest: use w_max >= {need} "
            f"(or fewer recent tokens) for {MIN_REACH}x")


def fit_budget(wc, w_max):
    """wc with its oldest entries dropped until its cost is <= w_max (the WC then starts later)."""
    entries = list(wc.entries)
    cost = wc.cost
    while cost > w_max and len(entries) > 1:
        cost -= entries.pop(0).cost
    return WorkingContext(entries)
