"""WorkingContext (nanochat/megacontext/working_context.py): tiling, edits, assembly, the invariant checker."""

import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck

from nanochat.megacontext.positions import slot_rotary
from nanochat.megacontext.working_context import Entry, OneMemory, WorkingContext, WorkingContextError, check_working_context

K = 32
D = 8


class ArraySource(OneMemory):
    """A history held as plain tensors: tokens and, per level, one distinct vector per complete
    gist (row i of level L = L*1000 + i in every channel, so a mix-up shows)."""

    def __init__(self, n_tokens, max_level=3):
        g = torch.Generator().manual_seed(n_tokens)
        self.ids = torch.randint(0, 100, (n_tokens,), generator=g)
        self.levels = {L: torch.arange(n_tokens // K ** L, dtype=torch.float32)[:, None].expand(-1, D) + 1000.0 * L
                       for L in range(1, max_level + 1)}

    @property
    def num_tokens(self):
        return len(self.ids)

    def num_gists(self, level):
        return len(self.levels[level]) if level in self.levels else 0

    def tokens(self, start, end):
        return self.ids[start:end]

    def gists(self, level, i0, i1):
        return self.levels[level][i0:i1]


EMBED = torch.nn.Embedding(100, D)
embed_tokens = lambda ids: EMBED(ids).detach()


def random_edits(wc, source, rng, n):
    """Apply up to n random legal edits (no budget), return the WCs visited."""
    seen = [wc]
    for _ in range(n):
        i = rng.randrange(len(wc))
        if rng.random() < 0.5 and wc.entries[i].level > 0:
            wc = wc.expand(i)
        elif wc.collapse_range(i, source) is not None:
            wc = wc.collapse(i, source)
        seen.append(wc)
    return seen


def test_recent_is_the_newest_whole_blocks_within_budget():
    src = ArraySource(1000)
    wc = WorkingContext.recent(src, 256)
    assert wc.end == 1000 and wc.cost <= 256 and all(e.level == 0 for e in wc.entries)
    assert wc.start == 768 and wc.entries[-1] == Entry(0, 992, 1000)  # 1000 - 768 = 232 <= 256; one more block would be 264
    check_working_context(wc, src, 256, recent_tokens=100)


def test_coarsest_covers_the_whole_history_cheaply():
    src = ArraySource(70_000)  # two complete LOD3 gists (32,768 tokens each), then LOD2 / LOD1 / raw
    wc = WorkingContext.coarsest(src, recent_tokens=64)
    check_working_context(wc, src, w_max=10_000, recent_tokens=64)
    assert wc.start == 0
    levels = [e.level for e in wc.entries]
    assert levels[0] == 3 and levels.count(3) == src.num_gists(3) == 2
    assert wc.cost < 200  # 2 LOD3 + a few LOD2/LOD1 + the recent blocks at LOD0
    assert all(e.level == 0 for e in wc.entries if e.end > 70_000 - 64)


def test_checker_names_each_broken_invariant():
    src = ArraySource(200)
    good = [Entry(1, 0, 32), Entry(0, 32, 64), Entry(1, 64, 96), Entry(0, 96, 128), Entry(0, 128, 160), Entry(0, 160, 192), Entry(0, 192, 200)]
    check_working_context(WorkingContext(good), src, w_max=200, recent_tokens=40)
    cases = {
        "gap": good[:1] + good[2:],
        "overlap": good[:1] + [Entry(0, 16, 48)] + good[1:],
        "tiling": good[:-1],  # does not reach the newest token
        "alignment": [Entry(1, 0, 32), Entry(0, 32, 48), Entry(0, 48, 64)] + good[2:],  # a short block mid-history
        "existence": good,  # checked against a tree without gists, below
        "budget": good,
        "recent": good,
    }
    for name, entries in cases.items():
        w_max = 100 if name == "budget" else 1000
        recent = 150 if name == "recent" else 0
        with pytest.raises(WorkingContextError, match=name if name not in ("gap", "overlap") else "tiling"):
            check_working_context(WorkingContext(entries), ArraySource(200, max_level=0) if name == "existence" else src, w_max, recent)
    short = WorkingContext.recent(src, 64)  # tokens 160..200: legal for 40 recent tokens, not for 150
    check_working_context(short, src, 64, recent_tokens=40)
    with pytest.raises(WorkingContextError, match="recent protection: the WC starts"):
        check_working_context(short, src, 64, recent_tokens=150)
    misaligned = [Entry(1, 16, 48)]  # failure mode 4: a gist that claims a span off its grid
    with pytest.raises(WorkingContextError, match="alignment"):
        check_working_context(WorkingContext([Entry(0, 0, 16)] + misaligned + [Entry(0, 48, 64)]), ArraySource(64), 1000)


def test_expand_and_collapse_change_cost_by_31_and_keep_tiling():
    src = ArraySource(40_000)
    wc = WorkingContext.coarsest(src, recent_tokens=32)
    i = next(i for i, e in enumerate(wc.entries) if e.level == 2)
    bigger = wc.expand(i)
    assert bigger.cost == wc.cost + 31 and len(bigger) == len(wc) + 31
    assert [e.level for e in bigger.entries[i:i + 32]] == [1] * 32
    check_working_context(bigger, src, 10_000, 32)
    j = i + 5
    raw = bigger.expand(j)
    assert raw.entries[j] == Entry(0, bigger.entries[j].start, bigger.entries[j].end) and raw.cost == bigger.cost + 31
    assert raw.collapse(j, src) == bigger and bigger.collapse(i + 17, src) == wc  # any sibling collapses the group
    with pytest.raises(WorkingContextError):
        raw.expand(j)  # already tokens
    assert raw.collapse_range(j + 1) is None  # LOD1 siblings of a raw block are not a whole group


def test_collapse_needs_the_parent_gist():
    src = ArraySource(1100, max_level=1)  # 32 LOD1 siblings, but the tree made no LOD2 gist
    wc = WorkingContext.coarsest(src, recent_tokens=0)
    assert [e.level for e in wc.entries[:32]] == [1] * 32
    assert wc.collapse_range(0, src) is None and wc.collapse_range(0) is not None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 5000), seed=st.integers(0, 10_000), recent=st.integers(0, 200))
def test_property_edits_stay_legal_and_collapse_undoes_expand(n, seed, recent):
    import random
    src = ArraySource(n)
    rng = random.Random(seed)
    wc = WorkingContext.coarsest(src, recent_tokens=recent)
    for w in random_edits(wc, src, rng, 30):
        check_working_context(w, src, w_max=10 ** 9)
        for i, e in enumerate(w.entries):
            if e.level > 0:
                up = w.expand(i)
                assert up.collapse(i, src) == w and up.cost == w.cost + 31
                break


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3000), w_max=st.integers(32, 4000))
def test_property_all_lod0_assembly_equals_the_token_embeddings(n, w_max):
    src = ArraySource(n)
    wc = WorkingContext.recent(src, w_max)
    slots = wc.assemble(src, embed_tokens)
    ids = src.ids[wc.start:]
    assert torch.equal(slots["embeds"], embed_tokens(ids))
    assert torch.equal(slots["token_ids"], ids) and (slots["lod"] == 0).all()
    assert torch.equal(slots["positions"], torch.arange(len(ids), dtype=torch.float64))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3000), w_max=st.integers(1, 4000))
def test_property_the_truncated_baseline_is_exactly_the_newest_w_max_tokens(n, w_max):
    """Unlike `recent` (whole blocks: 97-128 of 128 tokens), the evaluations' baseline reads exactly
    the newest w_max tokens, its oldest entry cut off the block grid where needed."""
    src = ArraySource(n)
    wc = WorkingContext.truncated(src, w_max)
    assert wc.cost == min(n, w_max) and wc.start == max(0, n - w_max) and wc.end == n
    assert all(e.start % K == 0 and e.end - e.start <= K for e in wc.entries[1:])
    slots = wc.assemble(src, embed_tokens)
    assert torch.equal(slots["token_ids"], src.ids[-w_max:])
    assert torch.equal(slots["positions"], torch.arange(min(n, w_max), dtype=torch.float64))


def test_assembly_of_a_mixed_wc():
    src = ArraySource(3000)
    wc = WorkingContext.coarsest(src, recent_tokens=40)  # LOD1 ... then the newest blocks raw
    wc = wc.expand(0).expand(0)  # LOD2 of tokens 0..1023 -> 32 LOD1, the first of them -> raw
    slots = wc.assemble(src, embed_tokens)
    T = wc.cost
    assert all(slots[k].shape[0] == T for k in ("embeds", "token_ids", "lod", "positions", "entry"))
    assert torch.equal(slots["embeds"][:32], embed_tokens(src.ids[:32]))
    e = wc.entries[1]  # the next entry: a gist, at its span's center, holding its own row
    assert e.level >= 1
    assert slots["lod"][32] == e.level and slots["token_ids"][32] == -1
    assert slots["positions"][32] == e.start + (e.end - e.start - 1) / 2
    assert torch.equal(slots["embeds"][32], src.gists(e.level, e.index, e.index + 1)[0])
    assert slots["entry"][31] == 0 and slots["entry"][32] == 1
    last = wc.entries[-1]
    assert torch.equal(slots["token_ids"][-(last.end - last.start):], src.ids[last.start:])


def test_assembly_feeds_the_model():
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=128, vocab_size=100, n_layer=2, n_head=2, n_kv_head=2, n_embd=32))
    model.init_weights()
    src = ArraySource(5000)
    src.levels = {L: torch.nn.functional.rms_norm(torch.randn(len(v), 32), (32,)) for L, v in src.levels.items()}
    wc = WorkingContext.coarsest(src, recent_tokens=64)
    slots = wc.assemble(src, model.embed_tokens)
    ids = slots["token_ids"][None]
    logits = model(ids, inputs_embeds=slots["embeds"][None], rotary=slot_rotary(model, slots["positions"], slots["lod"]), lod=slots["lod"])
    assert logits.shape == (1, wc.cost, 100) and torch.isfinite(logits).all()


def test_assembly_from_a_real_tree_with_gistnet():
    from nanochat.gpt import norm
    from nanochat.megacontext.gistnet import GistNet
    from nanochat.megacontext.tree import MegaContextTree
    torch.manual_seed(0)
    wte = torch.nn.Embedding(100, D)
    embed = lambda ids: norm(wte(ids))
    tree = MegaContextTree(D, GistNet(D, kind="mlp", max_level=2).eval(), embed)
    ids = torch.randint(0, 100, (2500,))
    tree.ingest(ids)
    wc = WorkingContext.coarsest(tree, recent_tokens=100)
    check_working_context(wc, tree, w_max=1000, recent_tokens=100)
    assert [e.level for e in wc.entries[:3]] == [2, 2, 1]
    with torch.no_grad():
        slots = wc.assemble(tree, embed)
    assert torch.equal(slots["embeds"][0], tree.gist(2, 0)) and torch.equal(slots["embeds"][2], tree.gist(1, 64))
    tail = wc.entries[-1]
    assert torch.equal(slots["token_ids"][-(tail.end - tail.start):], ids[tail.start:])
    assert torch.equal(slots["embeds"][-1], embed(ids[-1:])[0])
    # device and dtype are the caller's, never read off embed_tokens' owner: a bf16 table still assembles in
    # float32 unless bf16 is asked for
    wte.to(torch.bfloat16)
    with torch.no_grad():
        assert wc.assemble(tree, embed)["embeds"].dtype == torch.float32
        bf16 = wc.assemble(tree, embed, device="cpu", dtype=torch.bfloat16)["embeds"]
    assert bf16.dtype == torch.bfloat16 and bf16.device.type == "cpu"


class HugeSource(OneMemory):
    """A 40M-token history that stores nothing: every token is 0, every gist a zero vector."""
    num_tokens = 40_000_000

    def num_gists(self, level):
        return self.num_tokens // K ** level if level <= 4 else 0

    def tokens(self, start, end):
        return torch.zeros(end - start, dtype=torch.long)

    def gists(self, level, i0, i1):
        return torch.zeros(i1 - i0, D)


def test_positions_stay_exact_far_past_float32_integers():
    src = HugeSource()
    wc = WorkingContext.coarsest(src, recent_tokens=64)
    assert wc.start == 0 and wc.cost < 400
    slots = wc.assemble(src, embed_tokens)
    n = src.num_tokens
    assert slots["positions"].dtype == torch.float64
    assert torch.equal(slots["positions"][-4:], torch.arange(n - 4, n, dtype=torch.float64))  # float32 would give ..96, 96, 00, 00
    e = next(i for i, e in enumerate(wc.entries) if e.level == 1)  # a LOD1 gist deep in the history: center x.5
    slot = int((slots["entry"] == e).nonzero()[0])
    assert slots["positions"][slot] == wc.entries[e].start + 15.5


def test_recency_filled_keeps_every_token_reachable_and_the_newest_raw_within_budget():
    src = ArraySource(5000, max_level=2)  # 4 LOD2 gists, 156 LOD1 gists
    wc = WorkingContext.recency_filled(src, 256, recent_tokens=32)
    check_working_context(wc, src, 256, recent_tokens=32)
    assert wc.start == 0 and wc.cost + 31 > 256  # the whole history, and no further expansion fits
    levels = [e.level for e in wc.entries]
    assert levels == sorted(levels, reverse=True)  # coarse to fine: the newest content is the finest
    raw = [e for e in wc.entries if e.level == 0]
    assert raw[-1].end == 5000 and sum(e.cost for e in raw) > 256 - 32 * 4  # most of the budget holds the newest tokens raw
    assert WorkingContext.recency_filled(src, 10**6) == WorkingContext.recent(src, 10**6)  # a budget that fits everything: all raw
    tight = WorkingContext.recency_filled(src, 64, recent_tokens=32)
    assert tight == WorkingContext.coarsest(src, 32)  # nothing fits beyond the coarsest WC


@pytest.mark.parametrize("n0, grow", [(40, 1), (64, 1), (70, 100), (95, 1), (33, 31)])
def test_extend_keeps_every_slot_and_tiles_the_new_tokens_raw(n0, grow):
    small, big = ArraySource(n0), ArraySource(n0 + grow)
    wc = WorkingContext.recency_filled(small, 64, recent_tokens=8)
    out = wc.extend(big)
    assert out.entries[:len(wc) - 1] == wc.entries[:-1]  # only the newest (maybe short) block may change
    assert out.entries[len(wc) - 1].start == wc.entries[-1].start
    assert out.cost == wc.cost + grow and out.end == n0 + grow
    check_working_context(out, big, out.cost, recent_tokens=8)
    assert wc.extend(small) == wc


@pytest.mark.parametrize("max_level", [None, 1, 2])
@pytest.mark.parametrize("recent", [0, 16, 32, 64])
@pytest.mark.parametrize("w_max", [64, 96, 128, 160])
def test_reachable_history_is_where_the_coarsest_view_first_overflows(w_max, recent, max_level):
    """Brute force over every history length: the coarsest WC fits w_max up to reachable_history, not one token past."""
    from nanochat.megacontext.working_context import reachable_history
    reach = reachable_history(w_max, recent, max_level)

    class Full(OneMemory):  # a tree with every complete node up to max_level
        def __init__(self, n):
            self.num_tokens = n

        def num_gists(self, level):
            return self.num_tokens // K ** level if max_level is None or level <= max_level else 0

    limit = min(reach + 2, 6_000)
    first_over = next((n for n in range(1, limit + 1) if WorkingContext.coarsest(Full(n), recent).cost > w_max), None)
    if reach + 1 <= limit:
        assert first_over == reach + 1, (reach, first_over)
    else:
        assert first_over is None  # (past the brute force's reach: 6k tokens)
