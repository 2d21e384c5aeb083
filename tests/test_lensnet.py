"""
LensNet and its losses: bounded per-entry scores, bidirectional attention over entries and tail
(failure mode 8), padding, and lens losses that are real, vectorized functions of the scores
(failure mode 3): non-zero gradients, the better variant preferred, masked entries untouched.
"""

import pytest
import torch

from nanochat.gpt import norm
from nanochat.megacontext.lensnet import LensNet, lens_targets, pairwise_lens_loss, regression_lens_loss, variant_utilities

D = 32


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return LensNet(D, n_layer=2, n_head=4, n_tail=3, max_level=3, **kw)


def wc(B=2, E=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    embeds = norm(torch.randn(B, E, D, generator=g))
    levels = torch.randint(0, 4, (B, E), generator=g)
    tail = norm(torch.randn(B, 3, D, generator=g))
    return embeds, levels, tail


def test_scores_shape_and_bounds():
    lens = make()
    embeds, levels, tail = wc()
    for t in (None, tail):
        scores = lens(embeds, levels, t)
        assert scores.shape == (2, 10) and scores.dtype == torch.float32
        assert (scores.abs() < 1).all() and scores.std() > 1e-3  # not a constant
    assert make(hidden=16)(embeds, levels, tail).shape == (2, 10)


def test_tanh_bound_holds_for_huge_inputs():
    lens = make()
    with torch.no_grad():
        lens.head.weight.mul_(1e4)  # saturate the tanh
    embeds, levels, tail = wc()
    scores = lens(embeds * 1e6, levels, tail * 1e6)
    assert torch.isfinite(scores).all() and (scores.abs() <= 1).all()
    assert (scores.abs() > 0.99).float().mean() > 0.5  # really pushed to the bound


def test_first_score_sees_later_entries_and_the_tail():
    lens = make()
    embeds, levels, tail = wc()
    base = lens(embeds, levels, tail)
    changed = embeds.clone()
    changed[:, -1] = norm(torch.randn(2, D))
    assert ((lens(changed, levels, tail)[:, 0] - base[:, 0]).abs() > 1e-4).all()
    later_level = levels.clone()
    later_level[:, -1] = (later_level[:, -1] + 1) % 4
    assert ((lens(embeds, later_level, tail)[:, 0] - base[:, 0]).abs() > 1e-4).all()
    assert ((lens(embeds, levels, -tail)[:, 0] - base[:, 0]).abs() > 1e-4).all()


def test_padding_is_ignored():
    lens = make()
    embeds, levels, tail = wc(B=1, E=6)
    short = lens(embeds, levels, tail)  # (1, 6)
    padded_embeds = torch.cat([embeds, norm(torch.randn(1, 4, D))], dim=1)
    padded_levels = torch.cat([levels, torch.full((1, 4), 3)], dim=1)
    mask = torch.arange(10)[None] < 6
    padded = lens(padded_embeds, padded_levels, tail, mask=mask)
    assert torch.allclose(padded[:, :6], short, atol=1e-5)
    assert (padded[:, 6:] == 0).all()


def test_bad_levels_and_shapes():
    lens = make()
    embeds, levels, tail = wc()
    with pytest.raises(ValueError, match="levels"):
        lens(embeds, levels + 4, tail)
    with pytest.raises(AssertionError):
        lens(embeds, levels, tail[:, :2])


def slate():
    """5 variants of a 6-entry WC: 0 = the current WC, 1 = expand entry 2 (best), 2 = collapse
    entry 3 (worst), 3 = expand 2 + collapse 3, 4 = expand entry 4 (slightly worse than nothing)."""
    edits = torch.zeros(1, 5, 6)
    edits[0, 1, 2] = 1
    edits[0, 2, 3] = -1
    edits[0, 3, 2], edits[0, 3, 3] = 1, -1
    edits[0, 4, 4] = 1
    delta_nll = torch.tensor([[0.50, 0.20, 0.90, 0.40, 0.55]])
    return edits, delta_nll


def reference_pairwise(scores, edits, delta_nll, beta, weighted):
    """The same loss with Python loops over pairs (tests only)."""
    u = variant_utilities(scores, edits)
    total, weight_sum = 0.0, 0.0
    for b in range(edits.size(0)):
        for i in range(edits.size(1)):
            for j in range(edits.size(1)):
                if delta_nll[b, i] < delta_nll[b, j] and not torch.equal(edits[b, i], edits[b, j]):
                    w = float(delta_nll[b, j] - delta_nll[b, i]) if weighted else 1.0
                    total = total + w * torch.nn.functional.softplus(-beta * (u[b, i] - u[b, j]))
                    weight_sum += w
    return total / weight_sum


@pytest.mark.parametrize("weighted", [True, False])
def test_pairwise_loss_matches_a_loop_over_pairs(weighted):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 8, generator=g) * 2 - 1
    edits = torch.randint(-1, 2, (3, 6, 8), generator=g).float()
    edits[:, 1] = edits[:, 0]  # a duplicate variant: never paired with its twin
    delta_nll = torch.rand(3, 6, generator=g)
    loss = pairwise_lens_loss(scores, edits, delta_nll, beta=2.0, weighted=weighted)
    assert torch.allclose(loss, reference_pairwise(scores, edits, delta_nll, 2.0, weighted), atol=1e-6)


def test_pairwise_loss_prefers_the_lower_delta_nll():
    edits, delta_nll = slate()
    logits = torch.zeros(1, 6, requires_grad=True)
    loss = pairwise_lens_loss(torch.tanh(logits), edits, delta_nll)
    loss.backward()
    assert loss.item() > 0 and logits.grad.abs().sum() > 0  # a real function of the scores
    assert (logits.grad[0, [0, 1, 5]] == 0).all()  # entries no variant edits get no gradient
    optimizer = torch.optim.Adam([logits], lr=0.1)
    for _ in range(30):
        optimizer.zero_grad()
        pairwise_lens_loss(torch.tanh(logits), edits, delta_nll).backward()
        optimizer.step()
    scores = torch.tanh(logits).detach()
    assert scores[0, 2] > 0.5  # expanding entry 2 helped: expand it
    assert scores[0, 3] > 0.1  # collapsing entry 3 hurt: do not collapse it
    assert scores[0, 4] < 0  # expanding entry 4 did not help
    utilities = variant_utilities(scores, edits)[0]
    assert torch.equal(utilities.argsort(descending=True), delta_nll[0].argsort())  # same ranking


def test_pairwise_loss_ignores_padding_variants_and_ties():
    edits, delta_nll = slate()
    scores = torch.rand(1, 6) * 2 - 1
    valid = torch.tensor([[True, True, True, True, False]])
    a = pairwise_lens_loss(scores, edits, delta_nll, valid=valid)
    poisoned = delta_nll.clone()
    poisoned[0, 4] = float("nan")
    assert torch.allclose(a, pairwise_lens_loss(scores, edits, poisoned, valid=valid))
    tied = pairwise_lens_loss(scores.requires_grad_(True), edits, torch.full((1, 5), 0.3))
    tied.backward()  # no preference anywhere: zero loss and zero gradient, but still in the graph
    assert tied.item() == 0 and (scores.grad == 0).all()


def test_regression_loss_masks_entries():
    scores = torch.tensor([[0.2, -0.5, 0.9, 0.0]], requires_grad=True)
    targets = torch.tensor([[1.0, float("nan"), -1.0, 0.0]])
    mask = torch.tensor([[True, False, True, True]])
    loss = regression_lens_loss(scores, targets, mask)
    assert torch.allclose(loss, torch.tensor((0.8 ** 2 + 1.9 ** 2 + 0.0) / 3))
    loss.backward()
    assert scores.grad[0, 1] == 0 and scores.grad[0, 0] != 0 and scores.grad[0, 2] != 0


def test_lens_targets_distance_regularized_argmin():
    edits, delta_nll = slate()
    targets, mask = lens_targets(edits, delta_nll, lam=0.0)
    assert torch.equal(targets, edits[:, 1])  # variant 1 wins: expand entry 2, touch nothing else
    assert mask.tolist() == [[False, False, True, True, True, False]]  # only entries some variant edited
    # a big enough edit distance penalty makes "change nothing" (variant 0) win
    targets, _ = lens_targets(edits, delta_nll, lam=0.5)
    assert (targets == 0).all()
    # padding variants never win, even with the lowest delta_nll
    padded = torch.cat([delta_nll, torch.tensor([[-9.0]])], dim=1)
    padded_edits = torch.cat([edits, -torch.ones(1, 1, 6)], dim=1)
    valid = torch.tensor([[True] * 5 + [False]])
    targets, mask = lens_targets(padded_edits, padded, lam=0.0, valid=valid)
    assert torch.equal(targets, edits[:, 1]) and not mask[0, 0]
    # softmin: targets in [-1, 1], leaning towards the winner, hard argmin as temperature -> 0
    soft, _ = lens_targets(edits, delta_nll, lam=0.0, temperature=0.2)
    assert (soft.abs() <= 1).all() and soft[0, 2] > 0.5 and soft[0, 3] > -0.5
    assert torch.allclose(lens_targets(edits, delta_nll, lam=0.0, temperature=1e-4)[0], edits[:, 1])


def test_lens_targets_mark_each_member_of_a_collapsed_group_minus_one():
    """slate.perturb marks a collapse of n siblings -1/n on each member; the targets must be -1 there, or
    scores fitted to them (-1/32 for a group of 32) would never pass the allocator's -tau_collapse."""
    edits = torch.zeros(1, 3, 6)
    edits[0, 1, :4] = -0.25  # variant 1: collapse a group of 4 siblings
    edits[0, 2, 5] = 1.0  # variant 2: expand entry 5
    delta_nll = torch.tensor([[0.0, -0.30, -0.29]])
    targets, mask = lens_targets(edits, delta_nll, lam=0.0)
    assert targets[0].tolist() == [-1.0, -1.0, -1.0, -1.0, 0.0, 0.0] and mask[0].tolist() == [True] * 4 + [False, True]
    # the distance counts the whole collapse as one edit, like the expansion: at lam 0.02 the collapse still
    # wins (-0.28 vs -0.27); counted per member (4 edits) it would lose (-0.22)
    targets, _ = lens_targets(edits, delta_nll, lam=0.02)
    assert targets[0, :4].eq(-1).all() and targets[0, 5] == 0
    soft, _ = lens_targets(edits, delta_nll, lam=0.0, temperature=0.01)
    assert (soft[0, :4] < -0.5).all() and (soft.abs() <= 1).all()


def test_lens_losses_train_every_lensnet_parameter():
    lens = make()
    embeds, levels, tail = wc(B=1, E=6)
    edits, delta_nll = slate()
    scores = lens(embeds, levels, tail)
    targets, mask = lens_targets(edits, delta_nll)
    loss = pairwise_lens_loss(scores, edits, delta_nll) + regression_lens_loss(scores, targets, mask)
    loss.backward()
    for name, p in lens.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_recency_cap_gives_every_entry_that_far_back_one_code():
    from nanochat.megacontext.lensnet import recency_features
    mask = torch.ones(1, 40, dtype=torch.bool)
    free, capped = recency_features(mask, 16), recency_features(mask, 16, cap=8)
    torch.testing.assert_close(capped[0, -9:], free[0, -9:])  # 0..8 back: as without a cap
    assert torch.equal(capped[0, 0], capped[0, 31]) and not torch.equal(free[0, 0], free[0, 31])  # 39 and 8 back: alike
    torch.manual_seed(0)
    net = LensNet(32, n_layer=1, hidden=32, n_tail=0, max_level=1, recency_cap=4)
    x, levels = torch.randn(1, 12, 32), torch.ones(1, 12, dtype=torch.long)
    x[0, 0] = x[0, 3]  # the same gist 11 and 8 entries back: capped, it scores the same wherever it sits
    assert net(x, levels)[0, 0].item() != pytest.approx(net(x, levels)[0, 1].item())
    assert net(x, levels)[0, 0].item() == pytest.approx(net(x, levels)[0, 3].item(), abs=1e-6)
