"""
GistNet and build_gists: shapes, normalization, step-0 mean pooling, bidirectional pooling
(failure mode 8), shared vs per-level weights, the gist pyramid, gradients.
"""

import pytest
import torch

from nanochat.gpt import norm
from nanochat.megacontext import BLOCK_SIZE
from nanochat.megacontext.gistnet import GistNet, build_gists, build_gists_batch
from conftest import jitter

D = 32
VARIANTS = [("linear", "mean"), ("mlp", "mean"), ("transformer", "mean"), ("transformer", "query"), ("transformer", "cls")]


def make(kind="transformer", pooling="cls", shared=True, max_level=2, perturb=False, seed=0):
    torch.manual_seed(seed)
    net = GistNet(D, kind=kind, pooling=pooling, n_layer=2, n_head=4, shared=shared, max_level=max_level)
    if perturb:  # the init zeroes the head (and the level embedding); make every weight matter
        jitter(net.parameters(), 0.1)
    return net


def token_like(*shape):
    return norm(torch.randn(*shape, D))  # normalized, like model.embed_tokens


@pytest.mark.parametrize("kind,pooling", VARIANTS)
def test_shape_normalization_and_step0_mean(kind, pooling):
    blocks = token_like(5, BLOCK_SIZE)
    for shared in (True, False):
        net = make(kind, pooling, shared=shared)
        for level in (1, 2):
            out = net(blocks, level)
            assert out.shape == (5, D) and torch.isfinite(out).all()
            # step 0: exactly the normalized mean of the children
            assert torch.allclose(out, norm(blocks.mean(dim=1)), atol=1e-5)
        out = make(kind, pooling, shared=shared, perturb=True)(blocks, 1)
        rms = out.square().mean(dim=-1).sqrt()
        assert torch.allclose(rms, torch.ones(5), atol=1e-3)  # lives where normalized token embeddings live
        assert not torch.allclose(out, norm(blocks.mean(dim=1)), atol=1e-3)  # the head now matters


@pytest.mark.parametrize("pooling", ["cls", "query", "mean"])
@pytest.mark.parametrize("perturb", [False, True])
def test_transformer_pooling_sees_the_whole_block(pooling, perturb):
    # A causal encoder with CLS in front returned one vector for every block. Here the pooled
    # summary must depend on the LAST input, and different blocks must give different summaries,
    # already at init (perturb=False) and after training moves the weights.
    net = make("transformer", pooling, perturb=perturb)
    blocks = token_like(4, BLOCK_SIZE)
    changed = blocks.clone()
    changed[:, -1] = token_like(4)
    a, b = net.summarize(blocks, 1), net.summarize(changed, 1)
    assert ((a - b).norm(dim=-1) > 1e-2).all()
    assert torch.cdist(a, a)[~torch.eye(4, dtype=torch.bool)].min() > 1e-2  # 4 blocks, 4 distinct summaries
    # through the full forward, with the mean of the block held fixed (so the mean-pool residual
    # cannot explain the change): move the last row by d and the one before it by -d
    net = make("transformer", pooling, perturb=True)
    d = 0.5 * torch.randn(4, D)
    same_mean = blocks.clone()
    same_mean[:, -1] += d
    same_mean[:, -2] -= d
    assert torch.allclose(same_mean.mean(dim=1), blocks.mean(dim=1), atol=1e-6)
    assert ((net(blocks, 1) - net(same_mean, 1)).norm(dim=-1) > 1e-3).all()


def test_shared_vs_per_level_weights():
    shared = make("transformer", "query", shared=True, max_level=3)
    per_level = make("transformer", "query", shared=False, max_level=3)
    n_shared = sum(p.numel() for p in shared.parameters())
    n_per_level = sum(p.numel() for p in per_level.parameters())
    n_encoder = sum(p.numel() for p in shared.encoders[0].parameters())
    assert n_shared == n_encoder + 3 * D  # one encoder + the level embedding
    assert n_per_level == 3 * n_encoder
    blocks = token_like(3, BLOCK_SIZE)
    # per-level: each level has its own weights; moving level 2's leaves levels 1 and 3 alone
    per_level = make("transformer", "query", shared=False, max_level=3, perturb=True)
    before = [per_level(blocks, level) for level in (1, 2, 3)]
    assert not torch.allclose(before[0], before[1], atol=1e-3)
    jitter(per_level.encoders[1].parameters(), 0.1)
    after = [per_level(blocks, level) for level in (1, 2, 3)]
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
    assert not torch.allclose(before[1], after[1], atol=1e-3)
    # shared: the levels differ only through the learned level embedding
    shared = make("transformer", "query", shared=True, max_level=3, perturb=True)
    assert not torch.allclose(shared(blocks, 1), shared(blocks, 2), atol=1e-3)
    with torch.no_grad():
        shared.level_embed.zero_()
    assert torch.allclose(shared(blocks, 1), shared(blocks, 2), atol=1e-6)


@pytest.mark.parametrize("kind,pooling", [("mlp", "mean"), ("transformer", "cls")])
def test_build_gists_counts_and_matches_levelwise_calls(kind, pooling):
    net = make(kind, pooling, max_level=3, perturb=True)
    n = 2 * BLOCK_SIZE ** 2 + 100  # 67 LOD1 gists, 2 LOD2 gists, no LOD3
    embeds = token_like(n)
    levels = build_gists(embeds, net, max_level=3)
    assert len(levels) == 4 and levels[0] is embeds
    assert [t.shape for t in levels[1:]] == [(67, D), (2, D), (0, D)]
    lod1 = net(embeds[:67 * BLOCK_SIZE].view(67, BLOCK_SIZE, D), 1)
    lod2 = net(lod1[:2 * BLOCK_SIZE].view(2, BLOCK_SIZE, D), 2)
    assert torch.allclose(levels[1], lod1, atol=1e-5) and torch.allclose(levels[2], lod2, atol=1e-5)
    # one block on its own gives the same gist as inside the batch (no mixing across blocks)
    assert torch.allclose(net(embeds[32:64].view(1, BLOCK_SIZE, D), 1)[0], levels[1][1], atol=1e-5)
    short = build_gists(token_like(BLOCK_SIZE - 1), net, max_level=2)
    assert [t.shape for t in short] == [(BLOCK_SIZE - 1, D), (0, D), (0, D)]


def test_build_gists_batch_is_build_gists_of_each_sequence():
    net = make("transformer", "query", max_level=2, perturb=True)
    seqs = [token_like(BLOCK_SIZE ** 2 + 70), token_like(BLOCK_SIZE - 3), token_like(5 * BLOCK_SIZE + 1)]
    batched = build_gists_batch(seqs, net, max_level=2)
    assert len(batched) == 3
    for x, pyramid in zip(seqs, batched):
        alone = build_gists(x, net, max_level=2)
        assert pyramid[0] is x and [t.shape for t in pyramid] == [t.shape for t in alone]
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(pyramid[1:], alone[1:]))
    assert [t.size(0) for t in batched[0][1:]] == [34, 1] and [t.size(0) for t in batched[2][1:]] == [5, 0]


def test_gradients_reach_token_embeds_and_every_parameter():
    n = BLOCK_SIZE ** 2 + 40  # 33 LOD1 gists, 1 LOD2 gist; the last 8 tokens are in no complete block
    for perturb in (False, True):
        net = make("transformer", "query", max_level=2, perturb=perturb)
        embeds = token_like(n).requires_grad_(True)
        levels = build_gists(embeds, net, max_level=2)
        torch.manual_seed(1)
        loss = (levels[2] * torch.randn_like(levels[2])).sum()  # only through the LOD2 gist
        loss.backward()
        grad_rows = embeds.grad.norm(dim=-1)
        assert (grad_rows[:BLOCK_SIZE ** 2] > 0).all()  # every token under the LOD2 gist
        assert (grad_rows[BLOCK_SIZE ** 2:] == 0).all()  # tokens it does not cover
        assert net.encoders[0].head.weight.grad.abs().sum() > 0  # the zero-init head learns at step 0
        if perturb:  # once the head is non-zero, every parameter is in the graph
            for name, p in net.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bf16_input_keeps_dtype():
    net = make("transformer", "cls", perturb=True)
    out = net(token_like(2, BLOCK_SIZE).bfloat16(), 1)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        GistNet(D, kind="conv")
    with pytest.raises(ValueError, match="pooling"):
        GistNet(D, kind="mlp", pooling="cls")
    net = make("linear", "mean", max_level=2)
    with pytest.raises(ValueError, match="level"):
        net(token_like(1, BLOCK_SIZE), 3)
    with pytest.raises(ValueError, match="level"):
        net(token_like(1, BLOCK_SIZE), 0)


def test_any_level_serves_deeper_levels_with_the_deepest_trained_weights():
    from nanochat.megacontext.gistnet import AnyLevel
    torch.manual_seed(0)
    net = GistNet(16, kind="mlp", max_level=2)
    with torch.no_grad():
        net.level_embed.normal_()  # levels differ
    deep = AnyLevel(net)
    x = torch.randn(3, 32, 16)
    assert deep.max_level is None and deep.dim == 16
    assert torch.equal(deep(x, 1), net(x, 1)) and torch.equal(deep(x, 2), net(x, 2))
    assert torch.equal(deep(x, 5), net(x, 2)) and not torch.equal(deep(x, 5), net(x, 1))


def test_the_mean_kind_is_the_normalized_mean_with_no_weights_at_any_level():
    from nanochat.gpt import norm
    net = GistNet(64, kind="mean", max_level=2)
    assert list(net.parameters()) == [] and not net.shared
    x = torch.randn(5, 32, 64)
    for level in (1, 2):
        torch.testing.assert_close(net(x, level), norm(x.mean(dim=1)))
