import io
import copy
import math

import pytest
import torch

from nanochat.common import UserError
from nanochat.optim import Muon, load_optimizer_state, polar_express
from conftest import heavy_op_dtypes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def one_step(param, grad, **kw):
    """Clone param, take one Muon step with grad, return (new param, optimizer)."""
    p = torch.nn.Parameter(param.detach().clone())
    opt = Muon([p], **kw)
    p.grad = grad.clone()
    opt.step()
    return p.detach(), opt


# -----------------------------------------------------------------------------
# orthogonalization

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (48, 80), (80, 48), (4, 32, 96)])
def test_polar_express_singular_values_near_one(shape, device):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(*shape, generator=g).to(device)
    X = polar_express(G, steps=5)
    assert X.dtype == torch.bfloat16 and X.shape == G.shape
    s = torch.linalg.svdvals(X.float())
    assert s.min() > 0.6 and s.max() < 1.3, (s.min().item(), s.max().item())
    # and it is close to the exact polar factor U V^T, not just any orthogonal matrix
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    cos = (X.double() * (U @ Vh)).sum(dim=(-2, -1)) / (X.double().norm(dim=(-2, -1)) * (U @ Vh).norm(dim=(-2, -1)))
    assert cos.min() > 0.99


def test_polar_express_in_fp32_is_closer_to_the_exact_iteration_than_bf16():
    G = torch.randn(4, 64, 160, generator=torch.Generator().manual_seed(2))
    exact = polar_express(G.double(), dtype=torch.float64)
    fp32, bf16 = polar_express(G, dtype=torch.float32), polar_express(G)
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    assert (fp32.double() - exact).abs().max() < 1e-4 < (bf16.double() - exact).abs().max()


def test_muon_on_cpu_orthogonalizes_in_fp32_even_with_bf16_activations(monkeypatch):
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    g = torch.Generator().manual_seed(3)
    param, grad = torch.randn(48, 80, generator=g), torch.randn(48, 80, generator=g)
    seen = heavy_op_dtypes(lambda: one_step(param, grad, lr=0.02, momentum=0.0))
    assert seen and {dt for _, dt in seen} == {torch.float32}, seen
    new, _ = one_step(param, grad, lr=0.02, momentum=0.0, beta2=0.0, weight_decay=0.0)
    u = polar_express(grad, dtype=torch.float32)
    u = u * (u.square().mean(dim=-2, keepdim=True).clamp_min(1e-10).rsqrt())  # beta2 0: v = this step's u^2 (wide: per column)
    u = u * (polar_express(grad, dtype=torch.float32).norm() / u.norm())
    assert torch.allclose(new, param - 0.02 * u, atol=1e-6)


def test_polar_express_tall_is_transpose_of_wide():
    G = torch.randn(24, 72, generator=torch.Generator().manual_seed(1))
    assert torch.equal(polar_express(G.T.contiguous()), polar_express(G).T)


# -----------------------------------------------------------------------------
# the step

def test_descends_least_squares():
    g = torch.Generator().manual_seed(0)
    X, W_true = torch.randn(256, 32, generator=g), 0.1 * torch.randn(32, 16, generator=g)
    Y = X @ W_true
    W = torch.nn.Parameter(torch.zeros(32, 16))
    opt = Muon([W], lr=0.02, momentum=0.9)
    losses = []
    for _ in range(40):
        loss = ((X @ W - Y) ** 2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.05 * losses[0]
    assert all(b < a for a, b in zip(losses[:20], losses[1:21]))  # steadily down early on


def test_lr_scaled_by_sqrt_aspect_for_tall_only():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(8, 32, generator=g)  # wide; its transpose is 4x tall
    P = torch.zeros(8, 32)  # so the new weights are exactly -lr * update
    wide, _ = one_step(P, G, lr=0.01, momentum=0.0)
    tall, _ = one_step(P.T.contiguous(), G.T.contiguous(), lr=0.01, momentum=0.0)
    d_wide, d_tall = wide - P, tall - P.T
    torch.testing.assert_close(d_tall, 2.0 * d_wide.T, rtol=1e-5, atol=1e-7)  # sqrt(32/8) = 2
    # wide: plain lr times an update whose spectral norm is ~1
    assert 0.8 < torch.linalg.matrix_norm(d_wide / 0.01, ord=2) < 1.6


def test_cautious_weight_decay_only_on_sign_matching_entries():
    # G = [diag(s) | 0] is already orthogonal, so the update is ~[diag(s) | 0] with known signs
    s = torch.tensor([1.0, -1.0, 1.0, -1.0])
    G = torch.cat([torch.diag(s), torch.zeros(4, 4)], dim=1)   # (4, 8)
    P = torch.ones(4, 8)
    lr, wd = 0.1, 0.5
    no_wd, _ = one_step(P, G, lr=lr, momentum=0.0, weight_decay=0.0)
    with_wd, _ = one_step(P, G, lr=lr, momentum=0.0, weight_decay=wd)
    u = (P - no_wd) / lr
    assert (u.diagonal() * s > 0).all() and (u[:, 4:] == 0).all()
    mask = u * P >= 0                                           # as upstream: a zero update decays too
    assert mask[:, 4:].all() and not mask[1, 1] and not mask[3, 3]
    assert torch.equal(with_wd[~mask], no_wd[~mask])            # untouched bitwise
    torch.testing.assert_close(with_wd[mask], no_wd[mask] - lr * wd * P[mask])

    # general case: random signs, the decayed set is exactly {u * p >= 0}
    g = torch.Generator().manual_seed(3)
    G, P = torch.randn(16, 24, generator=g), torch.randn(16, 24, generator=g)
    no_wd, _ = one_step(P, G, lr=lr, momentum=0.0)
    with_wd, _ = one_step(P, G, lr=lr, momentum=0.0, weight_decay=wd)
    mask = (P - no_wd) * P >= 0
    assert 0 < mask.sum() < mask.numel()
    assert torch.equal(with_wd[~mask], no_wd[~mask])
    torch.testing.assert_close(with_wd[mask], no_wd[mask] - lr * wd * P[mask])


def test_factored_second_moment():
    g = torch.Generator().manual_seed(0)
    G1, G2 = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)  # tall
    O1, O2 = polar_express(G1, dtype=torch.float32), polar_express(G2, dtype=torch.float32)  # on a CPU Muon iterates in fp32
    P = torch.zeros(32, 16)
    new, opt = one_step(P, G1, lr=1.0, momentum=0.0, beta2=0.9)
    v = opt.state[opt.param_groups[0]["params"][0]]["second_momentum_buffer"]
    torch.testing.assert_close(v, 0.1 * O1.square().mean(dim=-1, keepdim=True))  # one stat per row
    upd = (P - new) / math.sqrt(32 / 16)  # undo the tall lr scaling
    torch.testing.assert_close(upd.norm(), O1.norm(), rtol=1e-4, atol=0)  # overall norm kept
    row_rms, orth_row_rms = upd.square().mean(dim=-1).sqrt(), O1.square().mean(dim=-1).sqrt()
    assert orth_row_rms.std() / orth_row_rms.mean() > 0.05   # rows of U V^T differ in size...
    assert row_rms.std() / row_rms.mean() < 1e-3             # ...the normalized step's do not
    # the EMA persists across steps
    p = opt.param_groups[0]["params"][0]
    p.grad = G2.clone()
    opt.step()
    v_expected = 0.9 * (0.1 * O1.square().mean(dim=-1, keepdim=True)) + 0.1 * O2.square().mean(dim=-1, keepdim=True)
    torch.testing.assert_close(opt.state[p]["second_momentum_buffer"], v_expected)


def test_momentum_change_takes_effect():
    g = torch.Generator().manual_seed(0)
    P, G1, G2 = (torch.randn(16, 32, generator=g) for _ in range(3))
    p = torch.nn.Parameter(P.clone())
    opt = Muon([p], lr=0.01, momentum=0.5)
    p.grad = G1.clone()
    opt.step()
    buf = opt.state[p]["momentum_buffer"]
    torch.testing.assert_close(buf, 0.5 * G1)
    opt.param_groups[0]["momentum"] = 0.9
    p.grad = G2.clone()
    opt.step()
    torch.testing.assert_close(buf, 0.9 * (0.5 * G1) + 0.1 * G2)

    # Nesterov: the step orthogonalizes lerp(g, buf, mu), not buf. With beta2=0 the step is a
    # function of that matrix alone, so a momentum-free optimizer fed it must take the same step.
    p = torch.nn.Parameter(P.clone())
    opt = Muon([p], lr=0.01, momentum=0.5, beta2=0.0)
    p.grad = G1.clone()
    opt.step()
    opt.param_groups[0]["momentum"] = 0.9
    before = p.detach().clone()
    p.grad = G2.clone()
    opt.step()
    lookahead = 0.1 * G2 + 0.9 * (0.9 * (0.5 * G1) + 0.1 * G2)
    expected, _ = one_step(before, lookahead, lr=0.01, momentum=0.0, beta2=0.0)
    torch.testing.assert_close(p.detach() - before, expected - before, rtol=1e-4, atol=1e-6)

    # the parameters follow too: same history, different momentum at step 2 -> different weights
    def run(mu2):
        q = torch.nn.Parameter(P.clone())
        o = Muon([q], lr=0.01, momentum=0.5)
        for grad, mu in ((G1, 0.5), (G2, mu2)):
            o.param_groups[0]["momentum"] = mu
            q.grad = grad.clone()
            o.step()
        return q.detach()
    assert not torch.allclose(run(0.5), run(0.95))


def test_rejects_non_matrix_params():
    with pytest.raises(ValueError):
        Muon([torch.nn.Parameter(torch.zeros(8))])


# -----------------------------------------------------------------------------
# groups, buckets, resume

SHAPES = [(16, 32), (32, 16), (16, 32), (24, 24)]


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(0.1 * torch.randn(*s, generator=g)) for s in SHAPES]


def make_opt(params):
    return Muon([dict(params=params[:3], lr=0.02, weight_decay=0.2),
                 dict(params=params[3:], lr=0.005, weight_decay=0.0)], momentum=0.85)


def set_grads(params, step):
    # deterministic, param-dependent gradients: grad of sum(w * (p - target)^2) per param
    g = torch.Generator().manual_seed(1000 + step)
    for p in params:
        target, w = torch.randn(p.shape, generator=g), torch.rand(p.shape, generator=g)
        p.grad = 2 * w * (p.detach() - target)


def schedule(opt, step):
    for group in opt.param_groups:  # the training loop schedules these every step
        group["momentum"] = 0.85 + 0.02 * step
        if group["weight_decay"] > 0:
            group["weight_decay"] = 0.2 * (1 - step / 10)


def fake_step(params, opt, step):
    set_grads(params, step)
    schedule(opt, step)
    opt.step()


def test_multi_group_different_shapes():
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = make_opt(params)
    fake_step(params, opt, 0)
    for p, b in zip(params, before):
        assert not torch.equal(p, b)
    stat_shapes = [tuple(opt.state[p]["second_momentum_buffer"].shape) for p in params]
    assert stat_shapes == [(1, 32), (32, 1), (1, 32), (24, 1)]
    # each group uses its own lr: a zero-lr group does not move
    params = make_params()
    opt = Muon([dict(params=params[:3], lr=0.0, weight_decay=0.2), dict(params=params[3:], lr=0.02)])
    before = [p.detach().clone() for p in params]
    fake_step(params, opt, 0)
    assert all(torch.equal(p, b) for p, b in zip(params[:3], before[:3]))
    assert not torch.equal(params[3], before[3])


def test_batched_bucket_matches_separate_steps():
    # the two (16, 32) params are stacked into one bucket; each must step as if alone
    params = make_params()
    opt = make_opt(params)
    for step in range(3):
        fake_step(params, opt, step)
    for i in (0, 2):
        alone = make_params()
        o = Muon([dict(params=[alone[i]], lr=0.02, weight_decay=0.2)], momentum=0.85)
        for step in range(3):
            fake_step(alone, o, step)  # same gradient stream; only alone[i] is stepped
        torch.testing.assert_close(alone[i], params[i], rtol=1e-4, atol=1e-6)


def test_state_dict_round_trip_is_bitwise():
    k, n = 3, 6
    straight = make_params()
    opt = make_opt(straight)
    for step in range(n):
        fake_step(straight, opt, step)

    first = make_params()
    opt = make_opt(first)
    for step in range(k):
        fake_step(first, opt, step)
    buf = io.BytesIO()  # as a checkpoint would: serialize model weights and optimizer state
    torch.save({"params": [p.detach() for p in first], "optim": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    del first, opt

    resumed = [torch.nn.Parameter(t.clone()) for t in ckpt["params"]]
    opt = make_opt(resumed)
    opt.load_state_dict(ckpt["optim"])
    for step in range(k, n):
        fake_step(resumed, opt, step)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_a_zero_gradient_only_decays():
    p = torch.nn.Parameter(torch.randn(8, 24))
    before = p.detach().clone()
    opt = Muon([p], lr=0.02, weight_decay=0.1)
    p.grad = torch.zeros_like(p)
    opt.step()
    # no NaN from 0/0 in the normalization; the weights decay alone (upstream's mask u * p >= 0 holds where u == 0)
    torch.testing.assert_close(p.detach(), before - 0.02 * 0.1 * before, rtol=0, atol=1e-7)
    assert all(torch.isfinite(t).all() for t in opt.state[p].values())


# -----------------------------------------------------------------------------
# sharded across DDP ranks

def many_params(seed=0):
    """Buckets of 5, 2 and 1 same-shape matrices: shares of 3 + 2, 1 + 1, and 1 + none on 2 ranks."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(16, 32)] * 5 + [(40, 24)] * 2 + [(8, 8)]
    return [torch.nn.Parameter(0.1 * torch.randn(*s, generator=g)) for s in shapes]


def _sharded_worker(rank, world_size, port, out_dir):
    import os
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        params = many_params()
        opt = Muon([dict(params=params, lr=0.02, weight_decay=0.2)], momentum=0.85)
        assert opt.world_size == 2
        for step in range(4):
            fake_step(params, opt, step)  # the same gradients on every rank, as after the all-reduce
        torch.save({"params": [p.detach() for p in params], "owned": sorted(i for i, p in enumerate(params) if opt.state[p]),
                    "optim": opt.state_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:  # the ranks meet at a barrier first: a bare destroy let gloo's worker abort the rank at exit (SIGABRT)
        from nanochat.common import compute_cleanup
        compute_cleanup()


def test_newton_schulz_sharded_over_two_gloo_ranks_equals_the_unsharded_step(tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_sharded_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    params = many_params()
    opt = Muon([dict(params=params, lr=0.02, weight_decay=0.2)], momentum=0.85)
    for step in range(4):
        fake_step(params, opt, step)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        for a, b in zip(r["params"], params):
            assert torch.equal(a, b)  # bitwise: each matrix's chain is computed as in the full batch
    assert ranks[0]["owned"] == [0, 1, 2, 5, 7] and ranks[1]["owned"] == [3, 4, 6]  # each rank keeps its share's state
    with pytest.raises(ValueError, match="sharded over 2 ranks, this run has 1"):
        Muon([dict(params=many_params(), lr=0.02)]).load_state_dict(ranks[0]["optim"])


def test_a_resumed_muon_state_must_hold_both_buffers_in_their_shapes():
    """A Muon state without its second moment crashed at the first step (KeyError); one of shape (rows, cols)
    ran on silently as a per-entry second moment, another algorithm. Both are refused at load, in one line."""
    p = torch.nn.Parameter(torch.randn(8, 4))
    opt = Muon([p], lr=0.01)
    p.grad = torch.randn(8, 4)
    opt.step()
    good = copy.deepcopy(opt.state_dict())
    assert good["state"][0]["second_momentum_buffer"].shape == (8, 1)
    load_optimizer_state(Muon([p], lr=0.01), copy.deepcopy(good), "ok.pt")
    for damage, message in ((lambda s: s.pop("second_momentum_buffer"), "lacks second_momentum_buffer"),
                            (lambda s: s.update(second_momentum_buffer=torch.zeros(8, 4)), r"has shape \(8, 4\), not \(8, 1\)")):
        bad = copy.deepcopy(good)
        damage(bad["state"][0])
        with pytest.raises(UserError, match="cannot resume the optimizer from bad.pt: ValueError: its .*" + message):
            load_optimizer_state(Muon([p], lr=0.01), bad, "bad.pt")


def test_polar_express_is_upstreams_iteration():
    """Upstream's table (a 2e-2 safety factor, cushion 2) and its normalization, ||X||_F * 1.02 + 1e-6 in the
    iteration's dtype; ours was the paper's table shrunk by 1.01 per power, normalized by * 1.01 + 1e-7."""
    from nanochat.optim import _PE_COEFFS
    assert _PE_COEFFS[0] == (8.156554524902461, -22.48329292557795, 15.878769915207462)
    assert _PE_COEFFS[4] == (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)
    G = torch.randn(8, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    X = G / (G.norm() * 1.02 + 1e-6)
    a, b, c = _PE_COEFFS[0]
    A = X @ X.T
    torch.testing.assert_close(polar_express(G, steps=1, dtype=torch.float64), a * X + (b * A + c * A @ A) @ X, rtol=1e-12, atol=1e-12)
