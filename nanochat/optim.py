"""
Muon: the optimizer for the 2-D weight matrices inside the transformer blocks.

One step, for every bucket of same-shape matrices in a param group (stacked, so the
orthogonalization runs as one batched matmul chain):
  1. Nesterov momentum:    buf = lerp(buf, g, 1 - mu);  u = lerp(g, buf, mu)
  2. Orthogonalize:        u ~= U V^T of u, by a 5-step Polar Express iteration (bf16 on GPUs,
                           fp32 on CPUs: common.orthogonalize_dtype)
  3. Factored 2nd moment:  v = lerp(v, mean(u^2) along one dim, 1 - beta2); u = u / sqrt(v),
                           then rescaled so ||u||_F is what it was before (NorMuon-style)
  4. Cautious decay, step: p -= lr * wd * p * [u * p >= 0];  p -= lr * u
with lr = group lr * sqrt(max(1, rows / cols)).

group["momentum"], group["lr"] and group["weight_decay"] are read fresh every step, so the
training loop may schedule them.

Under DDP (torch.distributed initialized, world size W > 1) the training loop all-reduces the
gradients before step(), so every rank holds the same gradients; each bucket of K matrices is then
split into W contiguous shares of ceil(K / W), each rank runs steps 1-4 on its share only (the
Newton-Schulz / Polar Express chain is most of Muon's cost: each rank does 1/W of it) and keeps
the momentum state of its share only, then an all_gather gives every rank every updated matrix.
The result equals the unsharded step (tested with 2 gloo ranks). A rank's optimizer file holds its
share's state, so a resume needs the same world size (load_state_dict refuses another).
"""

import math

import torch
import torch.distributed as dist

from nanochat.common import UserError, orthogonalize_dtype

# Polar Express per-step coefficients (a, b, c) of p(x) = a x + b x^3 + c x^5 (Amsel et al. 2025, "The Polar
# Express"), upstream nanochat's table: five steps designed with a 2e-2 safety factor (cushion 2), so bf16
# rounding cannot push a singular value past the convergence band. Steps past the five (upstream stops there)
# repeat the fixed point (1.875, -1.25, 0.375): p(1) = 1, p'(1) = 0.
_PE_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    (1.875, -1.25, 0.375),
]


def polar_express(G, steps=5, dtype=torch.bfloat16):
    """Approximate the polar factor U V^T of G (..., m, n), iterated and returned in `dtype` (bf16 or
    fp32). Singular values of the result land in ~0.85..1.13, except those of G below
    ~1e-3 * ||G||_F, which stay smaller."""
    tall = G.size(-2) > G.size(-1)
    if tall:
        G = G.mT  # work on the wide side: the Gram matrix X X^T is (min, min)
    # Frobenius norm >= spectral norm, so after this every singular value is <= 1/1.02 (in `dtype`, as upstream)
    X = G.to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)
    for i in range(steps):
        a, b, c = _PE_COEFFS[min(i, len(_PE_COEFFS) - 1)]
        A = X @ X.mT  # (..., k, k), k = min(m, n)
        X = a * X + (b * A + c * (A @ A)) @ X  # a X + b (X X^T) X + c (X X^T)^2 X
    return X.mT if tall else X


def second_moment_shape(p):
    """Muon's factored second moment of a (rows, cols) matrix: one value per row of the longer side."""
    rows, cols = p.shape
    return (rows, 1) if rows >= cols else (1, cols)


class Muon(torch.optim.Optimizer):
    """Muon with Nesterov momentum, Polar Express, factored second moment and cautious wd.
    Every param must be a 2-D matrix. State per param: momentum_buffer (like p) and
    second_momentum_buffer ((rows, 1) if rows >= cols else (1, cols))."""

    def __init__(self, params, lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.0):
        self.rank, self.world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        defaults = dict(lr=lr, momentum=momentum, ns_steps=ns_steps, beta2=beta2, weight_decay=weight_decay,
                        shards=self.world_size)  # saved with the state: a resume must shard the same way
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D matrices, got a param of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets = {}  # (shape, dtype, device) -> params, in group order
            for p in group["params"]:
                if p.grad is not None:
                    buckets.setdefault((p.shape, p.dtype, p.device), []).append(p)
            for params in buckets.values():
                self._step_bucket(params, group)
        return loss

    def load_state_dict(self, state_dict):
        saved = {g.get("shards", 1) for g in state_dict.get("param_groups", [])} if isinstance(state_dict, dict) else set()
        if saved and saved != {self.world_size}:
            raise ValueError(f"Muon state sharded over {sorted(saved)[0]} ranks, this run has {self.world_size} (resume with as many)")
        super().load_state_dict(state_dict)

    def _step_bucket(self, params, group):
        """One step of a bucket; under DDP this rank steps its share, then every rank gets every matrix."""
        if self.world_size == 1:
            return self._step_share(params, group)
        share = -(-len(params) // self.world_size)
        mine = params[self.rank * share:(self.rank + 1) * share]
        if mine:
            self._step_share(mine, group)
        out = torch.zeros((share,) + tuple(params[0].shape), dtype=params[0].dtype, device=params[0].device)  # (share, rows, cols)
        if mine:
            out[:len(mine)] = torch.stack(mine)
        gathered = [torch.empty_like(out) for _ in range(self.world_size)]
        dist.all_gather(gathered, out)
        for i, p in enumerate(params):
            p.copy_(gathered[i // share][i % share])

    def _step_share(self, params, group):
        rows, cols = params[0].shape
        for p in params:
            state = self.state[p]
            if not state:  # lazy init; load_state_dict fills these in on resume
                state["momentum_buffer"] = torch.zeros_like(p)
                state["second_momentum_buffer"] = torch.zeros(second_moment_shape(p), dtype=p.dtype, device=p.device)
        states = [self.state[p] for p in params]
        g = torch.stack([p.grad for p in params]).to(params[0].dtype)            # (K, rows, cols)
        buf = torch.stack([s["momentum_buffer"] for s in states])                # (K, rows, cols)
        v = torch.stack([s["second_momentum_buffer"] for s in states]).float()   # (K, rows, 1) | (K, 1, cols)

        # 1. Nesterov momentum: step along the gradient blended with the updated buffer
        mu = group["momentum"]
        buf.lerp_(g, 1 - mu)
        u = g.lerp(buf, mu)

        # 2. orthogonalize (bf16 on GPUs, fp32 on CPUs), back to fp32 for the rest
        u = polar_express(u, group["ns_steps"], orthogonalize_dtype(params[0].device.type)).float()

        # 3. factored second moment. After orthogonalization the vectors along the short side
        # are already ~unit norm, so per-entry scale varies along the long side: keep one
        # statistic per row (tall/square) or per column (wide).
        red = -1 if rows >= cols else -2
        u_sq = u.square().mean(dim=red, keepdim=True)                            # like v
        v.lerp_(u_sq, 1 - group["beta2"])
        inv_rms = v.clamp_min(1e-10).rsqrt()
        # rescale per matrix so the normalized update keeps u's Frobenius norm
        norm_sq = u_sq.sum(dim=(-2, -1), keepdim=True)
        new_norm_sq = (u_sq * inv_rms.square()).sum(dim=(-2, -1), keepdim=True)
        u = u * (inv_rms * (norm_sq / new_norm_sq.clamp_min(1e-30)).sqrt())

        # 4. cautious decoupled weight decay, then the step
        lr = group["lr"] * math.sqrt(max(1.0, rows / cols))
        wd = group["weight_decay"]
        for i, (p, state) in enumerate(zip(params, states)):
            state["momentum_buffer"].copy_(buf[i])
            state["second_momentum_buffer"].copy_(v[i])
            upd = u[i].to(p.dtype)
            if wd != 0:
                # decay only where the step -lr*upd does not push p away from zero (same sign, or no
                # step at all: upstream's mask is upd * p >= 0, so a zero update still decays)
                p.sub_(lr * wd * p * (upd * p >= 0))
            p.sub_(lr * upd)


def set_lr_multiplier(optimizers, multiplier):
    """Schedule step: every param group's lr = its initial_lr (set by GPT.setup_optimizers) x multiplier."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier


LIKE_PARAM = ("momentum_buffer", "exp_avg", "exp_avg_sq")  # state tensors shaped like their parameter


def load_optimizer_state(optimizer, state, where):
    """optimizer.load_state_dict(state) for a resume, with every state tensor checked: a damaged or
    foreign state (wrong structure, shapes of another model, NaN moments) is one line naming `where`.
    The moments, step counts and weight decays are the file's; the rates (lr, initial_lr) stay the
    optimizer's own, this run's flags (a resume at another --smear-lr or a fine-tune's rates take effect)."""
    rates = [{k: group[k] for k in ("lr", "initial_lr") if k in group} for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
        for group, own in zip(optimizer.param_groups, rates):
            group.update(own)
        for p, values in optimizer.state.items():
            for name, value in values.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                    raise ValueError(f"its {name} holds NaN or inf")
                if name in LIKE_PARAM and isinstance(value, torch.Tensor) and value.shape != p.shape:
                    raise ValueError(f"its {name} has shape {tuple(value.shape)} for a parameter of {tuple(p.shape)}")
            if isinstance(optimizer, Muon) and values:  # both buffers, the second moment factored (a full one would run, silently another algorithm)
                for name, shape in (("momentum_buffer", p.shape), ("second_momentum_buffer", second_moment_shape(p))):
                    if name not in values:
                        raise ValueError(f"its Muon state lacks {name}")
                    if tuple(values[name].shape) != tuple(shape):
                        raise ValueError(f"its {name} has shape {tuple(values[name].shape)}, not {tuple(shape)}")
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError, AttributeError) as e:
        raise UserError(f"cannot resume the optimizer from {where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
