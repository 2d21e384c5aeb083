"""
MegaContext runtime: one conversation over an unbounded history at a constant cost per token.

A Session holds
  tree    the whole history (MegaContextTree, on disk under `path` or in RAM); gists are made by
          gistnet.AnyLevel as blocks complete, as deep as the history needs
  wc      the WorkingContext the model reads; its cost never exceeds w_max
  slots   a slots.SlotCache: the KV cache over the WC's slots (w_max + 1: room for a gist-first plan slot)
feed(tokens) appends tokens to the tree and to the WC, brings the cache up to date and returns the
next-token logits:
  - every token adds one raw slot to the WC (WorkingContext.extend);
  - whenever a block of K tokens completes (every K tokens), the session refocuses:
      1. make room: collapse the oldest collapsible node (a raw block into its LOD1 gist, 32 sibling
         gists into their parent) until cost <= w_max - K, so the next K tokens fit;
      2. LensNet scores the entries and one FocusAllocator step makes up to n_diff expand / collapse
         edits under the same budget (the allocator's cooldowns carry across refocuses);
  - a feed of w_max tokens or more (the first prompt, a pasted document) starts the WC afresh from
    WorkingContext.recency_filled, then refocuses.
The cache names each slot by the WC entry it belongs to, keeps the longest prefix of unchanged
slots and recomputes from the first edited one. Positions are global (token 0 of the history is
position 0, or, with Core-Knowledge memories attached, the position after their tokens), so an
unchanged slot's keys stay valid however long the history grows. A token fed
between refocuses costs a one-slot forward; a refocus costs one forward from its first edit (at
most w_max slots, once per K tokens). Nothing here grows with the history except the tree, which
lives on disk in disk mode, so the cost per token at 1M tokens is that at 1k
(benchmarks/mc_inference.py measures it).
A session's w_max must keep at least MIN_REACH (4) x w_max tokens of history whole
(working_context.reachable_history: the longest history whose coarsest WC fits w_max - K); a smaller
one is refused with the smallest w_max that does. The tree makes gists at any depth (AnyLevel), so
only w_max bounds the reach: the coarsest WC holds up to 31 gists per level (w_max 128, recent 32:
4,126 tokens; w_max 256: ~8.6 billion). Past it the oldest entries leave the WC
(working_context.fit_budget), the tree keeps them, and `focus()` reports the tokens out of reach.

Gist-first decoding (gist_first=True, needs a MegaPredictor): when a generated token opens a new
block, the predictor reads the hidden state at the last token (the end of the latest block) and
predicts the gist of the block being started. That vector enters the WC as a plan slot (LOD1,
positioned at the block's center) in front of the block's tokens, which are then decoded with the
plan in view. The first token of a block is sampled before the plan exists (from the previous
token's logits, as in token-first decoding); once the block completes, or generation stops, the
plan leaves the WC and the block's real tokens (and soon its real gist) stand in its place.

Core-Knowledge memories (attach, before the first token; composite.py): trees built once from a
corpus (scripts/mc_build_ck.py), read-only, whose WC segments sit in front of the session's (the
WC then reads a CompositeSource of every tree, the session's last). The budget is shared (the
session keeps its share, make_room shrinks the memories first) and the one allocator refocuses
every memory; focus() reports each memory's part.

Sessions persist (session_file.py): save() flushes the disk tree and writes session.json atomically (WC entries,
plan, allocator cooldowns, sampling RNG state, the attached memories' paths and segments);
Session.open() reattaches the memories, rebuilds the cache from the saved WC and continues where
the session stopped (the same WC, the same next tokens).
"""

import os

import torch

from nanochat.common import UserError, atomic_write_json
from nanochat.engine import RowState, sample_next
from nanochat.megacontext import BLOCK_SIZE
from nanochat.megacontext.allocator import FocusAllocator, refocus
from nanochat.megacontext.composite import CompositeSource, attribution, read_ck_manifest, starting_wc
from nanochat.megacontext.gistnet import AnyLevel
from nanochat.megacontext.slots import SlotCache, slot_items
from nanochat.megacontext.tree import MegaContextTree
from nanochat.megacontext.session_file import SESSION_FILE, read_session, restore_session, session_state
from nanochat.megacontext.working_context import WorkingContext, check_working_context, ck_cap, fit_budget, reach_problem, reachable_history

K = BLOCK_SIZE


def make_room(wc, source, budget, recent_tokens, min_session_share=0.5):
    """Shrink wc to cost <= budget. With Core-Knowledge memories the CKs go first, down to their cap
    (ck_cap: never below the session's coarsest view), by the oldest collapse of any CK while one is
    left, else by dropping the oldest entry of the CK holding the most. Then the session: collapse its
    oldest collapsible node until the cost fits (a node ending within the newest recent_tokens stays);
    if nothing is left to collapse, drop its oldest entries."""
    *cks, session = wc.segments
    limit = ck_cap(source, budget, min_session_share, recent_tokens)
    while sum(c.cost for c in cks) > limit:
        for m, ck in enumerate(cks):  # a collapse refunds 31 slots and loses nothing
            i = next((i for i in range(len(ck)) if ck.collapse_range(i, source.memories[m]) is not None), None)
            if i is not None:
                cks[m] = ck.collapse(i, source.memories[m])
                break
        else:
            m = max(range(len(cks)), key=lambda m: cks[m].cost)
            if len(cks[m]) == 1:
                break  # every CK down to one entry: nothing left to give (the session copes below)
            cks[m] = WorkingContext(cks[m].entries[1:])
    tree, budget = source.memories[-1], budget - sum(c.cost for c in cks)
    protect_from = tree.num_tokens - recent_tokens
    while session.cost > budget:
        for i in range(len(session)):
            r = session.collapse_range(i, tree)
            if r is not None and r[2].end <= protect_from:
                session = session.collapse(i, tree)
                break
        else:
            session = fit_budget(session, budget)
            break
    return WorkingContext.joined(cks + [session])


class Session:
    def __init__(self, model, gistnet, lensnet, config, tree, predictor=None, w_max=None, gist_first=False, seed=0):
        """Use Session.create (a new history) or Session.open (a saved one). config: MegaContextConfig;
        w_max: the WC budget (default config.w_max); lensnet None: no content refocus, only make_room."""
        w_max = self.checked_budget(model, config, w_max, predictor, gist_first)
        self.reach = reachable_history(w_max - K, config.recent_tokens)  # tokens kept whole (AnyLevel: gists at any depth)
        self.model, self.lensnet, self.config, self.tree, self.predictor = model, lensnet, config, tree, predictor
        self.gistnet = gistnet
        self.w_max, self.gist_first = w_max, gist_first
        self.allocator = FocusAllocator.from_config(config, w_max=w_max - K)
        self.generator = torch.Generator(device=model.get_device()).manual_seed(seed)
        self.focus_generator = torch.Generator().manual_seed(seed)  # the stochastic allocator's draws (CPU), saved too
        self.source = tree              # what the WC reads: the tree, or a CompositeSource once memories are attached
        self.wc = None                  # the WorkingContext (over every memory), None before the first token
        self.plan = None                # (start, (D,) vector) of the live gist-first plan, or None
        self.slots = SlotCache(model, w_max + 1)  # the KV cache over the WC's slots (+ 1: a gist-first plan slot)
        self.logits = self.hidden = None  # (V,), (D,): the outputs at the last slot
        self.stats = dict(refocuses=0, edits=0, slots_computed=0, tokens_fed=0, forwards=0, last_edits=0, memory_edits=[0])
        self.memories = []              # attached Core-Knowledge memories: (name, tree, path), in slot order

    @staticmethod
    def checked_budget(model, config, w_max, predictor, gist_first):
        """The WC budget (w_max, default config.w_max) once the settings are known to make a session;
        else UserError. Session.create checks them before it writes anything."""
        w_max = config.w_max if w_max is None else w_max
        if w_max < config.recent_tokens + 2 * K:
            raise UserError(f"w_max {w_max} leaves no room: it needs recent_tokens ({config.recent_tokens}) + {2 * K} slots")
        problem = reach_problem(w_max, config.recent_tokens)
        if problem:  # it would fall back to a sliding window a few hundred tokens in
            raise UserError(problem)
        if w_max > model.config.sequence_len:  # the WC's oldest slots would sit outside every layer's attention window
            raise UserError(f"w_max {w_max} is more than the model attends to (its sequence_len, {model.config.sequence_len} slots)")
        if gist_first and predictor is None:
            raise UserError("gist-first decoding needs MegaPrediction weights (a run trained with --megaprediction)")
        return w_max

    # -------------------------------------------------------------------------
    # construction and persistence

    @classmethod
    def create(cls, model, gistnet, lensnet, config, path=None, predictor=None, w_max=None, gist_first=False, seed=0,
               model_name=""):
        """A new, empty session: its tree in RAM, or on disk under `path` (a new directory, saved at once,
        so that a session killed before its first save() opens again, empty)."""
        if path is not None and os.path.exists(os.path.join(path, SESSION_FILE)):
            raise UserError(f"{path} already holds a session: resume it (chat_cli --session {path}; Session.open) or delete it")
        cls.checked_budget(model, config, w_max, predictor, gist_first)  # refused settings leave nothing on disk
        tree = MegaContextTree(model.config.n_embd, AnyLevel(gistnet), model.embed_tokens, path=path, model_name=model_name,
                               device=model.get_device())
        session = cls(model, gistnet, lensnet, config, tree, predictor, w_max, gist_first, seed)
        if path is not None:
            session.save()
        return session

    @classmethod
    def open(cls, path, model, gistnet, lensnet, config, predictor=None, gist_first=None, model_name=None):
        """Reopen a saved session; it continues exactly where save() left it."""
        state, entries = read_session(path)
        tree = MegaContextTree.load(path, AnyLevel(gistnet), model.embed_tokens, dim=model.config.n_embd, model_name=model_name,
                                    device=model.get_device(), meta=state.get("tree"), meta_path=os.path.join(path, SESSION_FILE))
        tree.check_rows(model.config.vocab_size, path)
        tree.flush()  # meta.json agrees with the session's commit record again (a save killed after it: meta.json lagged)
        gist_first = state["gist_first"] if gist_first is None else gist_first
        session = cls(model, gistnet, lensnet, config, tree, predictor, state["w_max"], gist_first)
        restore_session(session, state, entries)
        if session.wc is not None:
            with torch.inference_mode():
                session._sync()
        return session

    def attach(self, path, name=None, tree=None):
        """Attach a Core-Knowledge memory (a tree built by scripts/mc_build_ck.py) before the session's
        first token: its WC segment sits in front of the session's (composite.py), read as if the
        memory came before the conversation, and the one allocator refocuses them all.
        tree: the memory already loaded (load_memory), to share one copy between sessions; it is only read."""
        if self.tree.num_tokens > 0:
            raise UserError("attach Core-Knowledge memories before the session's first token")
        self._attach(path, name, tree)
        if self.tree.path is not None and all(p is not None for _, _, p in self.memories):
            self.save()  # a session on disk is always one that opens again, memories included
        return self

    def load_memory(self, path):
        """A Core-Knowledge tree, read into RAM, checked against this session's model name."""
        if not os.path.isdir(path):
            raise UserError(f"Core-Knowledge memory {path}: no such directory")
        tree = MegaContextTree.load(path, AnyLevel(self.gistnet), self.model.embed_tokens, dim=self.model.config.n_embd,
                                    in_ram=True, model_name=self.tree.model_name or None, device=self.model.get_device())
        read_ck_manifest(path, tree)
        return tree.check_rows(self.model.config.vocab_size, f"Core-Knowledge memory {path}")

    def _attach(self, path, name, tree=None):
        """path None: `tree` lives only in RAM (an eval's memory); the session then cannot be saved."""
        tree = self.load_memory(path) if tree is None else tree
        if tree.num_tokens == 0 or tree.num_tokens % K:
            raise UserError(f"Core-Knowledge memory {path or name}: {tree.num_tokens} tokens, not a positive whole number "
                            f"of {K}-token blocks (build it with scripts/mc_build_ck)")
        name = name or (os.path.basename(os.path.normpath(path)) if path else f"ck{len(self.memories)}")
        if name in [n for n, _, _ in self.memories] + ["session"]:
            raise UserError(f"a memory named {name!r} is already attached")
        self.memories.append((name, tree, path and os.path.abspath(path)))
        self.source = CompositeSource(self.trees(), [n for n, _, _ in self.memories] + ["session"])
        self.stats["memory_edits"] = [0] * (len(self.memories) + 1)

    def save(self):
        """Make the session durable in one commit point: the tree's rows (not yet committed), then
        session.json, atomically, holding the tree's commit record (its row counts) with the WC, then
        the tree's own meta.json. A kill anywhere leaves the old session.json (the old state: open()
        cuts the tree back to its counts) or the new one (open() reads the tree at its counts)."""
        if self.tree.path is None:
            raise UserError("this session lives in RAM: create it with a path to save it")
        if any(path is None for _, _, path in self.memories):
            raise UserError("a memory attached from RAM (no path) cannot be saved with the session")
        self.tree.flush_rows()
        atomic_write_json(session_state(self), os.path.join(self.tree.path, SESSION_FILE))
        self.tree.flush()

    def close(self):
        self.tree.close()

    # -------------------------------------------------------------------------
    # feeding tokens

    @torch.inference_mode()
    def feed(self, tokens):
        """Append tokens (list of ints) to the history -> the next-token logits (V,) float32."""
        tokens = [int(t) for t in tokens]
        vocab = self.model.config.vocab_size
        if tokens and not 0 <= min(tokens) <= max(tokens) < vocab:  # checked before the tree takes any of them
            raise UserError(f"token id {next(t for t in tokens if not 0 <= t < vocab)} is not in the model's vocabulary (0..{vocab - 1})")
        if not tokens:
            if self.logits is None:
                raise UserError("the session is empty: feed it at least one token")
            return self.logits
        before = self.tree.num_tokens
        self.tree.ingest(tokens)
        n = self.tree.num_tokens
        self.stats["tokens_fed"] += len(tokens)
        if self.plan is not None and self.plan[0] + K <= n:
            self.plan = None  # its block is complete: the real tokens take over
        target = self.w_max - K
        if self.wc is None or len(tokens) >= self.w_max:  # the CKs at their coarsest, the session recency-filled in its share
            self.wc = starting_wc(self.source, target, self.config.recent_tokens, self.config.ck_min_session_share)
            self._refocus(target)
        else:
            self.wc = self.wc.extend(self.source)
            for _ in range(n // K - before // K):  # one refocus per block this feed completed
                self._refocus(target)
        return self._sync()

    def _refocus(self, target):
        """Make room for the next block, then one LensNet + allocator step (over every memory when
        Core-Knowledge memories are attached)."""
        recent, share = self.config.recent_tokens, self.config.ck_min_session_share
        wc = make_room(self.wc, self.source, target, recent, share)
        edits = []
        if self.lensnet is not None:
            wc, steps = refocus(self.model, self.lensnet, self.allocator, wc, self.source, iterations=1, generator=self.focus_generator)
            edits = [e for step in steps for e in step]
        self.wc = check_working_context(wc, self.source, self.w_max, recent, share)
        if self.memories:
            for edit in edits:
                self.stats["memory_edits"][edit.before[0].memory] += 1
        self.stats["refocuses"] += 1
        self.stats["edits"] += len(edits)
        self.stats["last_edits"] = len(edits)

    def trees(self):
        """The tree of each attached memory, the session's last (what the slot items read)."""
        return [tree for _, tree, _ in self.memories] + [self.tree]

    def _sync(self):
        """Bring the slot cache to the current WC (plus plan) -> the next-token logits (V,)."""
        items = slot_items(self.wc, None if self.plan is None else self.plan[0])
        self.logits, self.hidden, computed = self.slots.sync(items, self.source, None if self.plan is None else self.plan[1])
        self.stats["slots_computed"] += computed
        self.stats["forwards"] += 1
        return self.logits

    # -------------------------------------------------------------------------
    # decoding

    def _make_plan(self):
        """Gist-first: the predicted gist of the block starting at the next token, from the last hidden state."""
        with torch.inference_mode():
            gist = self.predictor(self.hidden[None].to(next(self.predictor.parameters()).dtype), 1)[0]  # (D,)
        self.plan = (self.tree.num_tokens, gist.float())

    def generate(self, max_tokens, temperature=1.0, top_k=None, tools=None):
        """Sample up to max_tokens tokens, each fed back into the session. Yields (token, forced):
        forced is True for a calculator output token (tools: an engine.ToolUse, which also stops the
        stream at <|assistant_end|> / <|bos|>; the stop token is yielded, and the history is fed
        <|assistant_end|> for it, as the chat format closes a reply: a <|bos|> there would open a new
        document in the middle of the conversation)."""
        if self.logits is None:
            raise UserError("feed the session a prompt before generating")
        row = RowState()
        try:
            for _ in range(max_tokens):
                forced = bool(row.forced)
                if forced:
                    token = row.forced.popleft()
                else:
                    token = int(sample_next(self.logits[None], self.generator, temperature, top_k)[0])
                if self.gist_first and self.tree.num_tokens % K == 0:
                    self._make_plan()  # this token opens a block: plan it first
                self.feed([tools.turn_end if tools is not None and token in tools.stop_tokens else token])
                yield token, forced
                if tools is not None:
                    tools.track(row, token)
                    if row.done:
                        return
        finally:
            if self.plan is not None:  # generation stopped mid-block: the plan goes with it
                self.plan = None
                with torch.inference_mode():
                    self._sync()

    def score(self, tokens, hits=False):
        """Teacher forcing through the session: feed `tokens` one at a time, as generate() would have
        produced them (gist-first plans included) -> (n,) float32 NLL of each token given all before it;
        with hits=True also (n,) bool: whether it was the argmax (greedy decoding would have said it)."""
        if self.logits is None:
            raise UserError("feed the session a prompt before scoring")
        nll, top = [], []
        try:
            for token in tokens:
                nll.append(-torch.log_softmax(self.logits.float(), dim=-1)[int(token)])
                top.append(int(self.logits.argmax()) == int(token))
                if self.gist_first and self.tree.num_tokens % K == 0:
                    self._make_plan()
                self.feed([token])
        finally:
            if self.plan is not None:
                self.plan = None
                with torch.inference_mode():
                    self._sync()
        nll = torch.stack(nll).cpu() if nll else torch.zeros(0)
        return (nll, torch.tensor(top, dtype=torch.bool)) if hits else nll

    @torch.inference_mode()
    def refocus(self, iterations=1):
        """Extra LensNet + allocator steps now, before the next token (a question just arrived: look
        harder); stops at the first step with no edit. -> the next-token logits (V,)."""
        if self.logits is None:
            raise UserError("feed the session a prompt before refocusing")
        for _ in range(iterations):
            before = self.stats["edits"]
            self._refocus(self.w_max - K)
            if self.stats["edits"] == before:
                break
        return self._sync()

    # -------------------------------------------------------------------------
    # telemetry

    def focus(self):
        """What the model sees now: the WC's LOD mix and budget use (the CLI's /focus)."""
        n = self.tree.num_tokens
        if self.wc is None:
            return dict(history_tokens=0, w_max=self.w_max)
        session = self.wc.segment(len(self.memories))  # the session's own entries
        levels = {}
        for e in session.entries:
            entries, slots = levels.get(e.level, (0, 0))
            levels[e.level] = (entries + 1, slots + e.cost)
        fed = max(1, self.stats["tokens_fed"])
        cost = self.wc.cost  # the session's slots and the attached memories'
        memories = None
        if self.memories:  # per memory: its slots, share, LOD mix, what it covers, the edits that touched it
            memories = attribution(self.wc, self.source)
            for m, report in enumerate(memories.values()):
                report["edits"] = self.stats["memory_edits"][m]
        return dict(
            history_tokens=n, w_max=self.w_max, wc_cost=cost, budget_use=cost / self.w_max, memories=memories,
            wc_entries=len(session), covered_from=session.start, unreachable_tokens=session.start,
            lod={f"lod{L}": dict(entries=c, slots=s) for L, (c, s) in sorted(levels.items())},
            tree_levels=len(self.tree.levels) - 1, plan=None if self.plan is None else self.plan[0],
            refocuses=self.stats["refocuses"], edits_per_refocus=self.stats["edits"] / max(1, self.stats["refocuses"]),
            slots_per_token=self.stats["slots_computed"] / fed,
        )


def format_focus(f):
    """focus() as a few lines for a terminal."""
    if not f.get("history_tokens"):
        return "focus: the history is empty"
    mix = ", ".join(f"LOD{k[3:]} {v['entries']} entries / {v['slots']} slots" for k, v in f["lod"].items())
    session = "the session's " if f.get("memories") else ""
    lines = [f"history {f['history_tokens']:,} tokens (tree levels 1..{f['tree_levels']}) | working context {f['wc_cost']}/{f['w_max']} "
             f"slots ({100 * f['budget_use']:.0f}% of the budget), {session}{f['wc_entries']} entries",
             f"{session}LOD mix: {mix}",
             f"refocuses {f['refocuses']}, {f['edits_per_refocus']:.2f} edits each | {f['slots_per_token']:.2f} slots computed per token"]
    if f["unreachable_tokens"]:
        lines.append(f"the oldest {f['unreachable_tokens']:,} tokens are out of reach (the budget cannot hold the coarsest view)")
    if f["plan"] is not None:
        lines.append(f"gist-first plan for the block at token {f['plan']:,}")
    for name, m in (f.get("memories") or {}).items():
        mix = ", ".join(f"LOD{k[3:]} {c}" for k, c in m["lod"].items())
        lines.append(f"memory {name}: {m['slots']} slots ({100 * m['share']:.0f}% of the WC), {mix} | covers {m['covered']:,} "
                     f"of {m['tokens']:,} tokens | {m['edits']} edits")
    return "\n".join(lines)
