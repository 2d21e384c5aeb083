"""
The slots a chat session's model reads, and the KV cache over them (runtime.Session holds one SlotCache).

A session's working context is laid out as a list of slot items:
  Entry             an entry of the WC (Entry.memory: a Core-Knowledge memory's, in attach order, or
                    the session's, last)
  Plan(start)       the gist-first plan slot: one slot holding the predicted gist of the block that
                    starts at token `start`, in front of that block's tokens; assembled as that block's
                    LOD1 entry (Entry(1, start, start + K)) whose gist is the plan's vector (PlanGist)
An LOD0 entry costs one slot per token, a gist entry and a plan one slot each. The cache keeps the
longest prefix of slots two layouts share (common_slots: a raw block that only grew keeps its slots)
and recomputes from the first slot that differs. Positions are global: memory m's token t sits at
offsets[m] + t, the session's tokens after every memory's, so a kept slot's keys stay valid however
long the history grows.
"""

from collections import namedtuple

import torch

from nanochat.engine import KVCache
from nanochat.megacontext import BLOCK_SIZE
from nanochat.megacontext.positions import slot_rotary
from nanochat.megacontext.working_context import Entry, OneMemory, WorkingContext

K = BLOCK_SIZE
Plan = namedtuple("Plan", ["start"])  # a gist-first plan slot, in front of the block that starts at `start`


def slot_items(wc, plan_start):
    """The WC's entries in slot order, with Plan(s) in front of the tokens of the session's block [s, s + K)."""
    if plan_start is None:
        return list(wc.entries)
    session = wc.num_memories - 1
    at = next((i for i, e in enumerate(wc.entries) if e.memory == session and e.level == 0 and e.start == plan_start), len(wc))
    return list(wc.entries[:at]) + [Plan(plan_start)] + list(wc.entries[at:])


def item_cost(item):
    return 1 if isinstance(item, Plan) else item.cost


def common_slots(old, new):
    """How many leading slots two slot-item lists share (a raw block that grew keeps its old slots)."""
    n = 0
    for a, b in zip(old, new):
        if a == b:
            n += item_cost(a)
            continue
        if isinstance(a, Entry) and isinstance(b, Entry) and a.level == b.level == 0 and a.start == b.start and a.memory == b.memory:
            n += min(a.end, b.end) - a.start
        break
    return n


class PlanGist(OneMemory):
    """The source a plan slot is assembled from: its block's LOD1 gist is the plan's (D,) vector."""

    def __init__(self, vector):
        self.vector = vector

    def gists(self, level, i0, i1):
        return self.vector[None]  # (1, D): the one gist of the one entry


class SlotCache:
    """A KVCache over one layout of slot items at a time, on the model's device and in its dtype.
    source: what the WC reads (the session's tree, or the CompositeSource of every memory's: an entry
    of memory m reads source.memories[m], its token t at global position source.offsets[m] + t);
    plan: the plan slot's (D,) vector or None."""

    def __init__(self, model, capacity):
        self.model, self.capacity = model, capacity  # capacity: the most slots a layout may have
        self.device, self.dtype = model.get_device(), model.transformer.wte.weight.dtype
        self.cache = None  # the KVCache, made at the first sync
        self.items = []    # the slot items it holds, in order

    def sync(self, items, source, plan=None):
        """Bring the cache to `items`: keep the unchanged slot prefix, forward the rest (the last slot
        always runs). -> (logits (V,) and hidden state (D,) at the last slot, slots computed)."""
        total = sum(item_cost(it) for it in items)
        if self.cache is None:
            self.cache = KVCache.for_model(self.model, 1, self.capacity)
        keep = min(common_slots(self.items, items), total - 1, int(self.cache.lengths[0]))
        if keep < int(self.cache.lengths[0]):
            self.cache.truncate(keep, self.embed_before(items, keep, source))
        batch = self.assemble_from(items, keep, source, plan)  # the slots from `keep` on
        logits, hidden = self.model(batch["idx"], kv_cache=self.cache, inputs_embeds=batch["embeds"],
                                    rotary=slot_rotary(self.model, batch["positions"], batch["lod"]), lod=batch["lod"],
                                    return_hidden=True)
        self.items = items
        return logits[0, -1], hidden[0, -1], batch["idx"].size(1)

    def embed_before(self, items, slot, source):
        """(1, 1, D) the pre-smear embedding of slot - 1: a token's, or zeros (no slot, a gist, a plan)."""
        zero = torch.zeros(1, 1, self.model.config.n_embd, device=self.device, dtype=self.dtype)
        seen = 0
        for it in items:
            c = item_cost(it)
            if seen + c >= slot:
                if slot == 0 or isinstance(it, Plan) or it.level > 0:
                    return zero
                ids = source.memories[it.memory].tokens(it.start + slot - 1 - seen, it.start + slot - seen)
                return self.model.embed_tokens(ids.to(self.device))[None].to(self.dtype)
            seen += c
        return zero

    def assemble_from(self, items, slot, source, plan=None):
        """The model inputs of every slot from index `slot` on, with global positions: dict of (1, T)
        tensors embeds, idx, lod, positions. Runs of entries between plans are assembled in one call."""
        device, dtype = self.device, self.dtype
        parts, seen, run = [], 0, []

        def flush_run():
            if run:
                wc = WorkingContext(run)
                a = wc.assemble(source, self.model.embed_tokens, device=device, dtype=dtype)
                parts.append((a["embeds"], a["token_ids"], a["lod"], a["positions"] + wc.origin(source)))
                run.clear()

        for it in items:
            c = item_cost(it)
            if seen + c > slot:
                if isinstance(it, Plan):  # the LOD1 entry of the block it predicts, its gist the plan's vector
                    flush_run()
                    a = WorkingContext([Entry(1, it.start, it.start + K)]).assemble(PlanGist(plan), device=device, dtype=dtype)
                    parts.append((a["embeds"], a["token_ids"], a["lod"], a["positions"] + (it.start + source.offsets[-1])))
                else:
                    skip = max(0, slot - seen)  # only a raw block can be entered part-way
                    run.append(it if skip == 0 else Entry(0, it.start + skip, it.end, it.memory))
            seen += c
        flush_run()
        embeds, ids, lod, pos = (torch.cat(x) for x in zip(*parts))
        return dict(embeds=embeds[None], idx=ids[None], lod=lod[None], positions=pos[None])
