"""Focus Allocator (nanochat/megacontext/allocator.py): scores -> legal expand / collapse edits."""

import random
import functools

import pytest
import torch
from hypothesis import given, settings, strategies as st

from nanochat.megacontext import BLOCK_SIZE as K
from nanochat.megacontext.allocator import FocusAllocator, refocus
from nanochat.megacontext.horizon import build_source
from nanochat.megacontext.tree import MegaContextTree
from nanochat.megacontext.working_context import Entry, WorkingContext, WorkingContextError, check_working_context
from conftest import loud, tiny


DIM = 8
EMBED = torch.nn.Embedding(97, DIM)  # fixed token embeddings: the allocator never looks at the values


def mean_gistnet(blocks, level):
    return blocks.mean(dim=1)  # (N, 32, D) -> (N, D): cheap and deterministic


@functools.lru_cache(maxsize=None)
def make_tree(n_tokens, max_level=None):
    """A real MegaContextTree over n tokens (cached: the allocator only reads it)."""
    tree = MegaContextTree(DIM, mean_gistnet, EMBED, max_level=max_level)
    tree.ingest(torch.arange(n_tokens) % 97)
    return tree


def random_wc(source, w_max, recent, rng, n_edits=60):
    """A WC reachable from the coarsest one by random legal edits."""
    wc = WorkingContext.coarsest(source, recent)
    for _ in range(n_edits):
        i = rng.randrange(len(wc))
        if wc.entries[i].level >= 1 and rng.random() < 0.6:
            if wc.cost + K - 1 <= w_max:
                wc = wc.expand(i)
        else:
            r = wc.collapse_range(i, source)
            if r is not None and r[2].end <= source.num_tokens - recent:
                wc = wc.collapse(i, source)
    return check_working_context(wc, source, w_max, recent)


def legal_collapses(wc, source, recent):
    """The distinct parents a collapse could make (an oracle written independently of the allocator)."""
    parents = set()
    for i in range(len(wc)):
        r = wc.collapse_range(i, source)
        if r is not None and r[2].end <= source.num_tokens - recent:
            parents.add(r[2])
    return parents


def lod0_wc(n_blocks):
    return WorkingContext(Entry(0, s, s + K) for s in range(0, n_blocks * K, K))


histories = dict(
    n=st.integers(200, 40_000), recent=st.sampled_from([0, 32, 100, 256]), extra=st.integers(0, 3000),
    max_level=st.sampled_from([None, 1, 2]), seed=st.integers(0, 2 ** 16),
)


def random_scores(wc, g):
    """(E,) in (-1, 1), correlated within each 1024-token region so that whole sibling groups
    of LOD1 gists score low together (uniform noise alone almost never collapses a group)."""
    region_bias = torch.rand(wc.end // 1024 + 1, generator=g) * 2 - 1
    noise = torch.rand(len(wc), generator=g) * 2 - 1
    return 0.7 * region_bias[torch.tensor([e.start // 1024 for e in wc.entries])] + 0.29 * noise


def setup(n, recent, extra, max_level, seed):
    source = make_tree(n, max_level)
    w_max = WorkingContext.coarsest(source, recent).cost + extra
    return source, w_max, random_wc(source, w_max, recent, random.Random(seed))


# -----------------------------------------------------------------------------
# properties over random histories, budgets and scores


@settings(max_examples=40, deadline=None)
@given(**histories, strategy=st.sampled_from(["greedy", "stochastic"]), n_diff=st.integers(0, 6), cooldown=st.integers(0, 3))
def test_every_step_leaves_a_legal_wc(n, recent, extra, max_level, seed, strategy, n_diff, cooldown):
    source, w_max, wc = setup(n, recent, extra, max_level, seed)
    alloc = FocusAllocator(w_max, n_diff=n_diff, cooldown=cooldown, strategy=strategy, recent_tokens=recent)
    g = torch.Generator().manual_seed(seed)
    for _ in range(4):
        scores = random_scores(wc, g)
        new_wc, edits = alloc.step(wc, scores, source, generator=g)
        check_working_context(new_wc, source, w_max, recent)
        assert new_wc.cost <= w_max and len(edits) <= n_diff
        n_expand = sum(e.kind == "expand" for e in edits)
        assert new_wc.cost == wc.cost + (K - 1) * (2 * n_expand - len(edits))  # +31 per expand, -31 per collapse
        for e in edits:  # an edit is one node <-> its children
            parent, children = (e.before[0], e.after) if e.kind == "expand" else (e.after[0], e.before)
            assert children[0].start == parent.start and children[-1].end == parent.end
            assert all(c.level == parent.level - 1 for c in children)
        wc = new_wc


@settings(max_examples=30, deadline=None)
@given(**histories, n_diff=st.integers(1, 6))
def test_expand_only_scores_add_detail_within_budget(n, recent, extra, max_level, seed, n_diff):
    source, w_max, wc = setup(n, recent, extra, max_level, seed)
    scores = 0.2 + 0.8 * torch.rand(len(wc), generator=torch.Generator().manual_seed(seed))  # all > tau_expand
    new_wc, edits = FocusAllocator(w_max, n_diff=n_diff, recent_tokens=recent).step(wc, scores, source)
    n_gists = sum(e.level >= 1 for e in wc.entries)
    assert all(e.kind == "expand" for e in edits)
    assert len(edits) == min(n_diff, n_gists, (w_max - wc.cost) // (K - 1))  # stops only at n_diff, gists or budget
    assert new_wc.cost == wc.cost + (K - 1) * len(edits) <= w_max


@settings(max_examples=30, deadline=None)
@given(**histories, n_diff=st.integers(1, 6))
def test_collapse_only_scores_reduce_cost(n, recent, extra, max_level, seed, n_diff):
    source, w_max, wc = setup(n, recent, extra, max_level, seed)
    scores = -0.2 - 0.8 * torch.rand(len(wc), generator=torch.Generator().manual_seed(seed))  # all < -tau_collapse
    new_wc, edits = FocusAllocator(w_max, n_diff=n_diff, recent_tokens=recent).step(wc, scores, source)
    assert all(e.kind == "collapse" for e in edits)
    assert len(edits) == min(n_diff, len(legal_collapses(wc, source, recent)))
    assert new_wc.cost == wc.cost - (K - 1) * len(edits)


@settings(max_examples=30, deadline=None)
@given(**histories)
def test_expand_after_collapse_restores_the_wc(n, recent, extra, max_level, seed):
    source, w_max, wc = setup(n, recent, extra, max_level, seed)
    for i in range(len(wc)):
        r = wc.collapse_range(i, source)
        if r is not None:
            j0, _, parent = r
            collapsed = wc.collapse(i, source)
            assert collapsed.entries[j0] == parent
            assert collapsed.expand(j0) == wc


# -----------------------------------------------------------------------------
# choice, alternation, budget


def mixed_wc():
    """10 LOD1 gists, then 54 LOD0 blocks: 2048 tokens, cost 1738."""
    return WorkingContext([Entry(1, s, s + K) for s in range(0, 10 * K, K)] + [Entry(0, s, s + K) for s in range(10 * K, 64 * K, K)])


def test_greedy_takes_the_largest_magnitude_first_and_alternates_collapse_first():
    source, wc = make_tree(64 * K), mixed_wc()
    scores = torch.zeros(len(wc))
    scores[:5] = torch.tensor([0.2, 0.5, 0.9, 0.3, 0.7])  # gists 0..4
    scores[20], scores[30], scores[40] = -0.6, -0.95, -0.4  # LOD0 blocks
    new_wc, edits = FocusAllocator(wc.cost + 2 * (K - 1), n_diff=4).step(wc, scores, source)
    assert [(e.kind, (e.before if e.kind == "expand" else e.after)[0].start // K) for e in edits] == \
        [("collapse", 30), ("expand", 2), ("collapse", 20), ("expand", 4)]
    _, edits = FocusAllocator(10_000, n_diff=1).step(wc, scores.clamp(min=0), source)
    assert edits[0].before == (Entry(1, 2 * K, 3 * K),)


def test_a_group_scores_the_mean_of_its_members():
    source = make_tree(2048 + 64)
    wc = WorkingContext([Entry(1, s, s + K) for s in range(0, 2048, K)] + [Entry(0, 2048, 2080), Entry(0, 2080, 2112)])
    scores = torch.zeros(len(wc))
    scores[:32] = -0.3
    scores[5] = 0.5  # group A: mean -0.275
    scores[32:64:2], scores[33:64:2] = -0.9, 0.5  # group B: mean -0.2, though its minimum is -0.9
    _, edits = FocusAllocator(10_000, n_diff=1).step(wc, scores, source)
    assert edits[0].after == (Entry(2, 0, 1024),)
    scores[32:64:2], scores[33:64:2] = -0.2, 0.05  # mean -0.075: not a collapse candidate
    scores[:32] = 0.0
    _, edits = FocusAllocator(10_000).step(wc, scores, source)
    assert edits == []


def test_expands_are_refused_over_budget_and_paid_by_collapse_refunds():
    source, wc = make_tree(64 * K), mixed_wc()
    scores = torch.zeros(len(wc))
    scores[2] = 0.9
    _, edits = FocusAllocator(wc.cost + K - 2).step(wc, scores, source)
    assert edits == []  # +31 would pass w_max
    scores[30] = -0.5
    new_wc, edits = FocusAllocator(wc.cost + K - 2).step(wc, scores, source)
    assert [e.kind for e in edits] == ["collapse", "expand"] and new_wc.cost == wc.cost


def test_recent_tokens_are_never_collapsed():
    source, wc = make_tree(20 * K), lod0_wc(20)
    new_wc, edits = FocusAllocator(wc.cost, n_diff=20, recent_tokens=100).step(wc, -0.9 * torch.ones(20), source)
    assert len(edits) == 16  # blocks 16..19 hold the newest 100 tokens (block 16 ends at 544 > 640 - 100)
    assert all(e.level == 0 for e in new_wc.entries[-4:])


# -----------------------------------------------------------------------------
# cooldown


@pytest.mark.parametrize("first", ["collapse", "expand"])
def test_cooldown_refuses_flipping_a_node_back_until_it_has_passed(first):
    source = make_tree(20 * K)
    wc = lod0_wc(20) if first == "collapse" else WorkingContext([Entry(1, 0, K)] + list(lod0_wc(20).entries[1:]))
    alloc = FocusAllocator(20 * K, cooldown=2)
    sign = -1.0 if first == "collapse" else 1.0
    scores = torch.zeros(len(wc))
    scores[0] = 0.9 * sign
    flipped, edits = alloc.step(wc, scores, source)
    assert [e.kind for e in edits] == [first] and flipped != wc
    back = torch.zeros(len(flipped))
    back[0] = -0.9 * sign
    back[5] = -0.9  # an unrelated block stays free to collapse meanwhile
    _, edits = alloc.step(flipped, back, source)
    assert [e.after[0].start for e in edits] == [5 * K]
    back[5] = 0.0
    assert alloc.step(flipped, back, source)[1] == []  # step 3: still within the cooldown of the step-1 edit
    restored, edits = alloc.step(flipped, back, source)  # step 4: allowed again
    assert len(edits) == 1 and restored == wc


def test_no_cooldown_allows_the_flip_on_the_next_step():
    source, wc = make_tree(20 * K), lod0_wc(20)
    alloc = FocusAllocator(20 * K, cooldown=0)
    collapsed, _ = alloc.step(wc, torch.tensor([-0.9] + [0.0] * 19), source)
    restored, edits = alloc.step(collapsed, torch.tensor([0.9] + [0.0] * 19), source)
    assert len(edits) == 1 and restored == wc


# -----------------------------------------------------------------------------
# stochastic strategy


def test_stochastic_is_deterministic_per_seed_and_breaks_ties_differently_across_seeds():
    source, wc = make_tree(20 * K), lod0_wc(20)
    scores = -0.5 * torch.ones(20)  # 20 tied collapse candidates

    def run(seed):
        alloc = FocusAllocator(wc.cost, strategy="stochastic", top_k=20, n_diff=3)
        new_wc, edits = alloc.step(wc, scores, source, generator=torch.Generator().manual_seed(seed))
        return new_wc, [e.after for e in edits]

    assert all(run(s) == run(s) for s in range(5))
    assert len({tuple(run(s)[1]) for s in range(10)}) > 1


def test_stochastic_favours_larger_magnitudes_at_low_temperature():
    source, wc = make_tree(20 * K), lod0_wc(20)
    scores = torch.full((20,), -0.3)
    scores[7] = -0.9
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        alloc = FocusAllocator(wc.cost, strategy="stochastic", temperature=0.01, top_k=20, n_diff=1)
        assert alloc.step(wc, scores, source, generator=g)[1][0].before == (Entry(0, 7 * K, 8 * K),)


# -----------------------------------------------------------------------------
# bad input


def test_bad_scores_and_illegal_input_are_refused():
    source, wc = make_tree(20 * K), lod0_wc(20)
    alloc = FocusAllocator(wc.cost)
    with pytest.raises(ValueError, match="one score per working-context entry"):
        alloc.step(wc, torch.zeros(19), source)
    with pytest.raises(ValueError, match="one score per working-context entry"):
        alloc.step(wc, torch.zeros(1, 20), source)
    with pytest.raises(ValueError, match="finite"):
        alloc.step(wc, torch.tensor([0.0] * 19 + [float("nan")]), source)
    with pytest.raises(WorkingContextError, match="budget"):
        FocusAllocator(wc.cost - 1).step(wc, torch.zeros(20), source)
    assert FocusAllocator(wc.cost - 1, check=False).step(wc, torch.zeros(20), source) == (wc, [])
    with pytest.raises(ValueError, match="strategy"):
        FocusAllocator(100, strategy="random")


# -----------------------------------------------------------------------------
# refocus: LensNet scores, then allocator steps (against a real model)

def test_refocus_stops_when_there_is_no_edit():
    model, gistnet, lensnet, cfg = tiny(w_max=128)
    source = build_source(model, gistnet, torch.randint(0, 256, (600,)), cfg.max_level)
    start = WorkingContext.coarsest(source, cfg.recent_tokens, cfg.max_level)
    with torch.no_grad():
        lensnet.head.weight.zero_()  # every score 0: inside both thresholds, no candidate
        wc, edits = refocus(model, lensnet, FocusAllocator.from_config(cfg), start, source, iterations=5)
    assert wc == start and edits == [[]]
    loud(lensnet)
    with torch.no_grad():
        lensnet.head.weight.normal_(std=10.0)  # large scores of both signs
        wc, edits = refocus(model, lensnet, FocusAllocator.from_config(cfg), start, source, iterations=50)
    assert edits[0] and wc != start and wc.cost <= cfg.w_max
    assert len(edits) == 50 or edits[-1] == []  # ran out of iterations, or stopped at the first idle one
    assert all(step for step in edits[:-1])  # no idle iteration before the last
