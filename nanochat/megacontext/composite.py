"""
Composite memories: several MegaContexts feeding one working context (the spec's cognitive core).

Memories, in a fixed order: Core-Knowledge (CK) MCs first, trees built once from a corpus
(scripts/mc_build_ck.py) and only read, then the Session MC, the conversation's own tree, last.
Each memory keeps its own block grid. The WC is the one working_context.WorkingContext type: its
entries name their memory and run memory by memory,
    [ CK_0 segment | CK_1 segment | ... | session segment ]
each segment a legal WC over its own memory (recent protection for the session only), so each
tiles its memory up to the memory's newest token. check_working_context, the allocator, make_room
and assembly all take the several-memory WC as they take a lone one.

Positions: the memories read as if they came one after another before the conversation: token t
of memory m sits at position offsets[m] + t, offsets[m] = the token counts of the memories before
it (CompositeSource.offsets). The session's newest token is the composite's last position and a
horizon continues after it.

Budget (working_context.ck_cap, checked by check_working_context): the total cost is <= w_max, and
the session is guaranteed its share: the CK segments together cost at most
    ck_cap = w_max - max(min(ceil(min_session_share * w_max), session tokens), session floor)
where the floor is the cost of the session's coarsest legal WC (its recent tokens raw, the rest as
gists), so the session can always be tiled whole (unless w_max is too small for even that: the CKs
keep a slot each and the session's oldest entries go, as without memories). A short session lends
its unused share to the CKs, and as it grows the CKs give it back (runtime.make_room shrinks them first).

The FocusAllocator (allocator.py) ranks the candidates of every memory together by |score|, an
expansion in memory m scored s - diversity * cost_m / w_max (the diversity penalty: a memory that
already holds much of the budget must be more useful to get more); an expansion that would pass
w_max, or for a CK the CK cap, is not a candidate.

Here: CompositeSource (the memories a WC reads), ingest_documents (building a CK), read_ck_manifest
(its ck.json, checked against the tree), starting_wc (the WC a session or a training row starts
from, of one memory or several) and attribution (what each memory holds of a WC).
"""

import os
import json

from nanochat.common import UserError
from nanochat.megacontext import BLOCK_SIZE
from nanochat.megacontext.working_context import WorkingContext, ck_cap, fit_budget

K = BLOCK_SIZE
CK_FILE = "ck.json"  # a CK's manifest, beside its tree files (scripts/mc_build_ck.py writes it)
CK_FORMAT = 1


class CompositeSource:
    """The memories a WC of several reads: CK sources then the session's (each a tree or a SequenceSource)."""

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


def read_ck_manifest(path, tree):
    """<path>/ck.json, checked against the CK's tree (its model, token and row counts, the files'
    spans tiling its tokens): the manifest dict, None for a tree saved without one (a plain
    MegaContextTree.save), or a one-line UserError naming the field that does not fit."""
    file = os.path.join(path, CK_FILE)
    if not os.path.exists(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            manifest = json.load(f)
    except (ValueError, RecursionError) as e:
        raise UserError(f"{file}: unreadable Core-Knowledge manifest ({type(e).__name__}: {str(e)[:120]})") from None
    get = manifest.get if isinstance(manifest, dict) else (lambda key: None)
    files, counts = get("files"), [rows.n for rows in tree.levels]
    spans_ok = isinstance(files, list) and all(
        isinstance(f, dict) and isinstance(f.get("path"), str) and type(f.get("start")) is int and type(f.get("end")) is int
        for f in files) and [f["start"] for f in files] == [0] + [f["end"] for f in files[:-1]] and all(
        f["start"] <= f["end"] for f in files) and (not files or files[-1]["end"] <= counts[0])
    checks = [("format", get("format") == CK_FORMAT), ("model", get("model") == tree.model_name),
              ("step", type(get("step")) is int), ("tokens", get("tokens") == counts[0]), ("levels", get("levels") == counts),
              ("input", isinstance(get("input"), str)), ("files", spans_ok)]
    bad = next((field for field, ok in checks if not ok), None)
    if bad is not None:
        raise UserError(f"{file}: field {bad} {str(get(bad))[:80]} does not fit the memory's tree "
                        f"(model {tree.model_name!r}, rows per level {counts}): rebuild it with scripts/mc_build_ck")
    return manifest


def starting_wc(source, w_max, recent_tokens, min_session_share):
    """The WC a session (or a training row) starts from: each CK at its coarsest, the session
    WorkingContext.recency_filled in its reserved share (w_max - ck_cap: all of w_max for a lone
    memory); what is left is free for LensNet to spend on whichever memory needs detail. A CK whose
    coarsest view passes its part of the cap keeps only its newest entries (fit_budget); its part:
    an even split of what the CKs before it left."""
    cap = ck_cap(source, w_max, min_session_share, recent_tokens)
    cks, left = [], cap
    for k, src in enumerate(source.memories[:-1]):  # water-filling: each CK its coarsest view, within an even share of what is left
        cks.append(fit_budget(WorkingContext.coarsest(src), max(1, left // (len(source.memories) - 1 - k))))
        left -= cks[-1].cost
    session = WorkingContext.recency_filled(source.memories[-1], w_max - cap, recent_tokens)
    return WorkingContext.joined(cks + [session])


def attribution(wc, source, edits=()):
    """Per memory, what it holds of the WC: {name: dict(slots, share (of the WC's cost), entries,
    lod {level: entries}, covered (tokens of the memory the segment tiles), tokens, edits (of `edits`,
    allocator Edits, those in that memory))}."""
    out = {}
    for m, (seg, name, src) in enumerate(zip(wc.segments, source.names, source.memories)):
        lod = {}
        for e in seg.entries:
            lod[e.level] = lod.get(e.level, 0) + 1
        out[name] = dict(slots=seg.cost, share=seg.cost / max(1, wc.cost), entries=len(seg),
                         lod={f"lod{L}": c for L, c in sorted(lod.items())}, covered=seg.end - seg.start,
                         tokens=src.num_tokens, edits=sum(1 for edit in edits if edit.before[0].memory == m))
    return out
