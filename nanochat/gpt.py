"""
The GPT model, as upstream nanochat defines it (see shared/spec/nanochat-baseline.md):
- token embedding -> parameter-free RMSNorm -> "smear" of the previous token's embedding
- per layer: x = resid_lambda*x + x0_lambda*x0, then attention + relu^2 MLP (pre-norm)
- rotary positions (base 100000), QK-norm scaled by 1.2, GQA, per-layer sliding windows
- value embeddings mixed into v on alternating layers, gated per kv head
- "backout": subtract a learned fraction of the mid-depth residual before the head
- untied lm_head, fp32 logits softcapped at 15
No biases anywhere. Linear weights are fp32 masters cast to the activation dtype in forward.
"""

import os
import math
import functools
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import UserError, compute_dtype


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"

    def to_dict(self):
        return asdict(self)


ROTARY_BASE = 100000
SMEAR_CHANNELS = 24   # channels of the current token that gate the smear
VE_GATE_CHANNELS = 12  # channels of the attention input that gate the value embedding
SOFTCAP = 15.0
QK_SCALE = 1.2


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def has_value_embedding(layer_idx, n_layer):
    """Alternating layers carry a value embedding; the last layer always does."""
    return layer_idx % 2 == (n_layer - 1) % 2


def window_sizes(config):
    """Per-layer attention window (in tokens): the pattern tiled over layers, last layer L."""
    pattern = config.window_pattern.upper()
    assert pattern and set(pattern) <= {"S", "L"}, f"window_pattern must use S and L, got {config.window_pattern!r}"
    long_window = config.sequence_len
    short_window = math.ceil(config.sequence_len / 4 / 128) * 128
    sizes = [long_window if pattern[i % len(pattern)] == "L" else short_window for i in range(config.n_layer)]
    sizes[-1] = long_window
    return sizes


def rotary_inv_freq(head_dim, device=None):
    """(D/2,) rotary frequencies w_i = base^(-2i/D), float32."""
    return ROTARY_BASE ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)


def apply_rotary(x, cos, sin):
    # x: (B, T, H, D); cos, sin: (1, T, 1, D/2)
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


class Linear(nn.Linear):
    """Bias-free linear with fp32 master weights, cast to the input's dtype in forward."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


class Embedding(nn.Embedding):
    """nn.Embedding whose default N(0, 1) init is skipped on the meta device, where models are
    built before to_empty(): a meta normal_ runs through torch._refs, whose first call imports
    torch._dynamo (~2 s of a script's start on a CPU; imported after init_process_group, it also
    keeps the process group alive past destroy_process_group). init_weights() or a checkpoint
    sets the values."""

    def reset_parameters(self):
        if self.weight.device.type != "meta":
            super().reset_parameters()


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.c_q = Linear(config.n_embd, self.n_head * self.head_dim)
        self.c_k = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_v = Linear(config.n_embd, self.n_kv_head * self.head_dim)
        self.c_proj = Linear(config.n_embd, config.n_embd)
        if has_value_embedding(layer_idx, config.n_layer):
            self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head)

    def forward(self, x, ve, cos, sin, window, kv_cache=None):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)      # (B, T, H, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)   # (B, T, Hkv, D)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)   # (B, T, Hkv, D)
        if ve is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, Hkv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is None:
            y = attend(q, k, v, window)
        else:  # decoding: append k, v to the cache, attend over everything cached (engine.KVCache)
            y = kv_cache.attend(self.layer_idx, q, k, v, window)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.c_proj(y)


@functools.lru_cache(maxsize=32)
def window_mask(Tq, Tk, window, device):
    """(Tq, Tk) bool: query i (the last Tq of Tk positions) sees key j iff 0 <= i - j <= window."""
    qpos = torch.arange(Tk - Tq, Tk, device=device).unsqueeze(1)  # (Tq, 1)
    kpos = torch.arange(Tk, device=device).unsqueeze(0)           # (1, Tk)
    return (qpos >= kpos) & (qpos - kpos <= window)


def use_flex(device):
    """Windowed attention through flex_attention: on CUDA by default; NANOCHAT_FLEX=1 / 0 forces it
    on / off (on a CPU flex_attention has no backward: tests use it for forward passes only)."""
    flag = os.environ.get("NANOCHAT_FLEX", "")
    return flag == "1" if flag in ("0", "1") else device.type == "cuda"


@functools.lru_cache(maxsize=32)
def window_block_mask(Tq, Tk, window, device):
    """The flex_attention BlockMask of window_mask: blocks wholly outside the band are skipped, so a
    short window costs O(T * window), with no (Tq, Tk) mask in memory."""
    from torch.nn.attention.flex_attention import create_block_mask
    offset = Tk - Tq  # the queries are the last Tq positions

    def visible(b, h, q_idx, kv_idx):
        d = q_idx + offset - kv_idx
        return (d >= 0) & (d <= window)
    return create_block_mask(visible, None, None, Tq, Tk, device=device)


@functools.cache
def flex_kernel(device_type):
    """flex_attention, compiled once on CUDA (its fused kernel); eager elsewhere (a reference)."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def attend(q, k, v, window):
    """Causal attention where query i (at the end of the key sequence) sees key j iff
    0 <= i - j <= window. q: (B, H, Tq, D), k/v: (B, Hkv, Tk, D) with Tk >= Tq.
    A window shorter than the keys: flex_attention with a block mask on CUDA (use_flex), else
    SDPA with an explicit (cached) mask, which takes SDPA off its FlashAttention kernel."""
    Tq, Tk = q.size(2), k.size(2)
    gqa = q.size(1) != k.size(1)
    if Tk - 1 <= window and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if use_flex(q.device):
        return flex_kernel(q.device.type)(q, k, v, block_mask=window_block_mask(Tq, Tk, window, str(q.device)), enable_gqa=gqa)
    mask = window_mask(Tq, Tk, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos, sin, window, kv_cache=None):
        x = x + self.attn(norm(x), ve, cos, sin, window, kv_cache)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.padded_vocab_size = math.ceil(config.vocab_size / 64) * 64
        head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.window_sizes = window_sizes(config)
        self.transformer = nn.ModuleDict(dict(
            wte=Embedding(self.padded_vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = Linear(config.n_embd, self.padded_vocab_size)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.value_embeds = nn.ModuleDict({
            str(i): Embedding(self.padded_vocab_size, kv_dim)
            for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)
        })
        # rotary tables are derived, never saved (non-persistent); 10x headroom over sequence_len.
        # A meta-device build only shapes them (a meta arange would import torch._dynamo, as above);
        # init_rotary() fills them once the model has storage.
        self.rotary_seq_len = config.sequence_len * 10
        if torch.get_default_device().type == "meta":
            cos, sin = (torch.empty(1, self.rotary_seq_len, 1, head_dim // 2) for _ in range(2))
        else:
            cos, sin = self._rotary_tables(self.rotary_seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotary_tables(self, seq_len, head_dim, device=None):
        inv_freq = rotary_inv_freq(head_dim, device)
        angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)  # (T, D/2)
        return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]  # (1, T, 1, D/2)

    @torch.no_grad()
    def init_weights(self):
        """Spec init, drawn in upstream's order (so one seed gives upstream's weights); also (re)builds the
        rotary tables, so it works after to_empty() from meta."""
        n_embd, n_layer = self.config.n_embd, self.config.n_layer
        bound = math.sqrt(3.0 / n_embd)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * bound, 0.4 * bound)
            nn.init.zeros_(block.mlp.c_proj.weight)
        denom = max(n_layer - 1, 1)
        for i in range(n_layer):
            self.resid_lambdas[i] = 1.15 - 0.10 * i / denom
            self.x0_lambdas[i] = 0.20 - 0.15 * i / denom
        self.smear_lambda.zero_()
        self.backout_lambda.fill_(0.2)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        for emb in self.value_embeds.values():  # in layer order
            nn.init.uniform_(emb.weight, -bound, bound)
        for block in self.transformer.h:
            if hasattr(block.attn, "ve_gate"):
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        self.init_rotary()
        self.cast_embeddings(compute_dtype(self.get_device().type))

    @torch.no_grad()
    def init_rotary(self):
        head_dim = self.config.n_embd // self.config.n_head
        self.cos, self.sin = self._rotary_tables(self.rotary_seq_len, head_dim, device=self.get_device())

    def cast_embeddings(self, dtype):
        """Embeddings are stored in the compute dtype (bf16 on recent GPUs, fp32 on CPU)."""
        self.transformer.wte.to(dtype=dtype)
        self.value_embeds.to(dtype=dtype)

    def get_device(self):
        return self.transformer.wte.weight.device

    # -------------------------------------------------------------------------
    # accounting

    def estimate_flops(self):
        """Training FLOPs per token: 6 * matmul params + attention (12 * H * D * window)."""
        embedding_params = self.transformer.wte.weight.numel() + sum(e.weight.numel() for e in self.value_embeds.values())
        scalar_params = self.resid_lambdas.numel() + self.x0_lambdas.numel() + self.smear_lambda.numel() + self.backout_lambda.numel()
        matmul_params = sum(p.numel() for p in self.parameters()) - embedding_params - scalar_params
        head_dim = self.config.n_embd // self.config.n_head
        T = self.config.sequence_len
        attn_flops = sum(12 * self.config.n_head * head_dim * min(w, T) for w in self.window_sizes)
        return 6 * matmul_params + attn_flops

    def num_scaling_params(self):
        """N for the data:param ratio: transformer block matrices + lm_head."""
        return sum(p.numel() for p in self.transformer.h.parameters()) + self.lm_head.weight.numel()

    # -------------------------------------------------------------------------
    # optimizers

    def setup_optimizers(self, unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, weight_decay=0.28, scalar_lr=0.5,
                         smear_lr=0.2, lr_multiplier=1.0):
        """AdamW for embeddings, head and scalars; Muon for every 2-D matrix in the blocks.
        Every group's lr (and its "initial_lr", what schedules scale) is multiplied by lr_multiplier
        (fine-tuning starts from a fraction of the pretraining rates). smear_lr, the rate of the smear gate
        and the smear and backout lambdas, is upstream's fixed 0.2 by default (no model or batch scaling)."""
        from nanochat.optim import Muon
        if self.transformer.wte.weight.dtype == torch.float16:
            raise UserError("NANOCHAT_DTYPE=float16 serves inference only: fp16 embeddings train to NaN within a step "
                            "(AdamW's eps 1e-10 and small squared gradients underflow in fp16, and there is no loss "
                            "scaling); train with bfloat16 or float32")
        scale = (self.config.n_embd / 768) ** -0.5
        adam_groups = [
            dict(params=[self.lm_head.weight], lr=unembedding_lr * scale, betas=(0.8, 0.96), weight_decay=0.01),
            dict(params=[self.transformer.wte.weight], lr=embedding_lr * scale, betas=(0.8, 0.995), weight_decay=0.001),
            dict(params=[e.weight for e in self.value_embeds.values()], lr=0.5 * embedding_lr * scale, betas=(0.8, 0.995), weight_decay=0.01),
            dict(params=[self.resid_lambdas], lr=0.01 * scalar_lr, betas=(0.8, 0.95), weight_decay=0.05),
            dict(params=[self.x0_lambdas], lr=scalar_lr, betas=(0.96, 0.95), weight_decay=0.0),
            dict(params=[self.smear_gate.weight, self.smear_lambda, self.backout_lambda], lr=smear_lr, betas=(0.8, 0.95), weight_decay=0.0),
        ]
        matrices = [p for p in self.transformer.h.parameters()]
        assert all(p.ndim == 2 for p in matrices)
        n_grouped = sum(len(g["params"]) for g in adam_groups) + len(matrices)
        assert n_grouped == len(list(self.parameters())), "every parameter must be in exactly one optimizer group"
        shapes = sorted({tuple(p.shape) for p in matrices})
        muon_groups = [dict(params=[p for p in matrices if tuple(p.shape) == s]) for s in shapes]
        fused = self.get_device().type == "cuda"
        adamw = torch.optim.AdamW(adam_groups, eps=1e-10, fused=fused)
        muon = Muon(muon_groups, lr=matrix_lr, momentum=0.95, weight_decay=weight_decay)
        optimizers = [adamw, muon]
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] *= lr_multiplier
                group["initial_lr"] = group["lr"]
        return optimizers

    # -------------------------------------------------------------------------
    # forward

    def smear(self, x, prev=None, keep=None):
        """For t >= 1 each position adds a gated fraction of the previous position's (pre-smear)
        normalized embedding. x: (B, T, C); prev: (B, 1, C), the embedding before x[:, 0] when
        decoding with a cache (zeros for an empty row), else None (x[:, 0] has no predecessor).
        keep: MegaContext only, 0 where slot t or t-1 is a gist (no smear there): (B, T-1, 1) for the
        pairs inside x, or (B, T, 1) with prev (whose own zero stands for "the slot before was a gist")."""
        if prev is None:
            if x.size(1) == 1:
                return x
            cur, before = x[:, 1:], x[:, :-1]
        else:
            cur, before = x, torch.cat([prev, x[:, :-1]], dim=1)
        before = before if keep is None else before * keep
        gate = torch.sigmoid(self.smear_gate(cur[..., :SMEAR_CHANNELS]))  # (B, Tc, 1)
        cur = cur + self.smear_lambda.to(x.dtype) * gate * before
        return cur if prev is not None else torch.cat([x[:, :1], cur], dim=1)

    def embed_tokens(self, idx):
        """Token ids -> normalized embeddings (..., C), before the smear. MegaContext gists live in
        this space, so a working context of tokens and gists is one tensor of these."""
        return norm(self.transformer.wte(idx))

    def forward(self, idx, targets=None, loss_reduction="mean", kv_cache=None, *, inputs_embeds=None, rotary=None, lod=None,
                logits_at=None, return_hidden=False, scored_only=False):
        """Vanilla: idx (B, T) token ids -> logits (B, T, V), or the loss given targets.
        MegaContext hook (inputs_embeds given): one working context of tokens and gists.
          inputs_embeds: (B, T, C) slot embeddings (embed_tokens(ids) at token slots, gists elsewhere)
          rotary: (cos, sin), each (B, T, 1, D/2) or (1, T, 1, D/2) float32: the slots' rotary factors, which
            the caller computes (megacontext/positions.py, slot_rotary: Gaussian RoPE from the position
            each slot stands for; this module never imports the MegaContext package)
          lod: (B, T) or (T,) long, 0 at token slots, the gist's level elsewhere
          idx: (B, T) token ids at token slots, any value (e.g. -1) at gist slots
          logits_at: (B, H) long or None: compute logits (and the loss: targets then (B, H)) only at
            these slots, e.g. the horizon after a working context (saves the (B, T, V) logits)
        Gist slots get no value embedding (it is keyed by token id; the slot's v is c_v(x) alone) and
        no smear in or out (the smear mixes in the previous token, and a gist is not one). With lod all
        0 and the rotary of positions 0..T-1 (T <= 4096, see positions.SPLIT) the result equals the
        vanilla forward on idx exactly.
          kv_cache (MegaContext): an engine.KVCache over the WC's slots; its windows and masks count
            slots, while `rotary` carries the positions, so the caller may keep any origin (runtime.py uses
            the history's token 0, which keeps cached slots valid as the history grows)
        return_hidden: also return the final residual stream (B, T, C) (before the head's norm), what
        MegaPrediction's readouts read: -> (logits or loss, hidden).
        scored_only (vanilla, with targets, mean or sum loss): run the head only where a target is not -1,
        the same loss up to float summation order (recall rows score ~2% of their targets, SFT rows ~56%)."""
        B, T = idx.shape
        if inputs_embeds is not None:
            out, x = self._forward_mixed(idx, inputs_embeds, rotary, lod, targets, loss_reduction, kv_cache, logits_at)
            return (out, x) if return_hidden else out
        emb = self.embed_tokens(idx)  # (B, T, C) pre-smear
        if kv_cache is None:
            assert T <= self.cos.size(1), f"sequence of {T} exceeds the rotary table ({self.cos.size(1)})"
            x = self.smear(emb)
            cos, sin = self.cos[:, :T].to(x.dtype), self.sin[:, :T].to(x.dtype)  # (1, T, 1, D/2)
        else:
            pos = kv_cache.positions(T)  # (B, T) absolute positions of the new tokens
            assert int(pos.max()) < self.cos.size(1), "decoding past the rotary table"
            x = self.smear(emb, kv_cache.smear_prev)
            cos, sin = self.cos[0][pos].to(x.dtype), self.sin[0][pos].to(x.dtype)  # (B, T, 1, D/2)
        x = self._trunk(x, idx, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T, emb[:, -1:])
        if scored_only and targets is not None and loss_reduction in ("mean", "sum"):
            scored = targets != -1  # (B, T)
            return self._head(x[scored][None], targets[scored][None], loss_reduction)  # (1, N, C) -> the loss
        out = self._head(x, targets, loss_reduction)
        return (out, x) if return_hidden else out

    def _trunk(self, x, idx, cos, sin, kv_cache=None, token_mask=None):
        """The layers: x (B, T, C) after the smear -> final residual (B, T, C). token_mask (B, T, 1),
        MegaContext only: 1 where the slot is a token, which alone gets a value embedding."""
        x0 = x
        x_mid = None
        for i, block in enumerate(self.transformer.h):
            # the fp32 lambdas as upstream, uncast: an eager bf16 product rounds them as a cast would, a compiled
            # one may keep them in fp32 (1.15, not bf16's 1.1484375); in fp32 nothing changes
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = None
            if str(i) in self.value_embeds:
                ve = self.value_embeds[str(i)](idx if token_mask is None else idx.clamp(min=0))
                ve = ve if token_mask is None else ve * token_mask
            x = block(x, ve, cos, sin, self.window_sizes[i], kv_cache)
            if i == self.config.n_layer // 2:
                x_mid = x
        return x - self.backout_lambda.to(x.dtype) * x_mid

    def _forward_mixed(self, idx, emb, rotary, lod, targets, loss_reduction, kv_cache, logits_at=None):
        B, T, C = emb.shape
        if rotary is None or lod is None or idx.shape != (B, T):
            raise ValueError(f"inputs_embeds {tuple(emb.shape)} needs rotary, lod and idx of shape ({B}, {T})")
        lod = lod.expand(B, T)
        token_mask = (lod == 0).unsqueeze(-1).to(emb.dtype)  # (B, T, 1)
        if kv_cache is None:
            x = self.smear(emb, keep=token_mask[:, 1:] * token_mask[:, :-1])
        else:  # the cache's smear_prev is zero after a gist slot (advance below), so keep masks the gists here
            kv_cache.positions(T)  # slot indices of the new slots: the attention masks
            keep = token_mask * torch.cat([torch.ones_like(token_mask[:, :1]), token_mask[:, :-1]], dim=1)  # (B, T, 1)
            x = self.smear(emb, kv_cache.smear_prev, keep=keep)
        cos, sin = (r.to(x.dtype) for r in rotary)  # (B or 1, T, 1, D/2)
        x = self._trunk(x, idx, cos, sin, kv_cache, token_mask=token_mask)
        if kv_cache is not None:
            kv_cache.advance(T, emb[:, -1:] * token_mask[:, -1:])
        hidden = x
        if logits_at is not None:
            x = x.gather(1, logits_at.unsqueeze(-1).expand(-1, -1, C))  # (B, H, C)
        return self._head(x, targets, loss_reduction), hidden

    def _head(self, x, targets, loss_reduction):
        B, T, _ = x.shape
        logits = self.lm_head(norm(x))[..., :self.config.vocab_size].float()  # (B, T, vocab)
        logits = SOFTCAP * torch.tanh(logits / SOFTCAP)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1, reduction=loss_reduction)
        if loss_reduction == "none":
            loss = loss.view(B, T)
        return loss

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Naive autoregressive sampling (full recompute per token), batch 1. Yields token ids."""
        assert isinstance(tokens, list)
        if not tokens or temperature < 0 or (top_k is not None and top_k < 1):  # a negative temperature samples the least likely
            raise ValueError(f"need a non-empty prompt, temperature >= 0 and top_k >= 1 or None (got {len(tokens)} tokens, "
                             f"temperature {temperature}, top_k {top_k})")
        device = self.get_device()
        rng = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
        ids = torch.tensor([tokens], dtype=torch.long, device=device)  # (1, T)
        for _ in range(max_tokens):
            logits = self.forward(ids[:, -self.config.sequence_len:])[:, -1, :]  # (1, vocab)
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits = logits.masked_fill(logits < v[:, [-1]], -float("inf"))
                probs = F.softmax(logits / temperature, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=rng)
            ids = torch.cat([ids, next_id], dim=1)
            yield next_id.item()
