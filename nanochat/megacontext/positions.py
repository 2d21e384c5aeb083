"""
Gaussian RoPE: rotary angles for working-context slots, computed from the positions given.

A slot stands for a span of the history: a token for itself, a level-L gist for K**L tokens.
It carries the span's center as its position and sigma = K**L as its uncertainty. Rotating a
vector by angle w*p with p ~ N(mu, sigma^2) gives, in expectation,
    E[cos(w p)] = cos(w mu) exp(-(sigma w)^2 / 2),   E[sin(w p)] = sin(w mu) exp(-(sigma w)^2 / 2)
so each rotary frequency w is damped by exp(-(sigma w)^2 / 2): a coarse gist keeps only the slow
frequencies, i.e. coarse position. Token slots (LOD0) are not damped at all, so they rotate
exactly as in the vanilla model.

Positions are never looked up in a fixed-size table: a history of 10M tokens has slots at
positions far beyond the training length. Choice of origin: the working context's earliest
covered token is position 0 (attention only sees differences, so the origin changes nothing
in exact arithmetic, and an all-token WC reads positions 0..T-1, the vanilla ones).
Precision: a float32 angle p*w at p = 10M has an error of about a radian, which would scramble
the fast frequencies of recent tokens. So a position is split p = hi + lo with lo = p mod 4096:
hi*w is reduced mod 2*pi in float64, lo*w is the float32 product the vanilla table uses. Below
4096 hi is 0 and the angles are bit-identical to the vanilla ones. Positions arrive as float64
(WorkingContext.assemble makes them so): float32 cannot hold x.5 gist centers past 2**23.

Note: the model applies QK-norm after the rotation, so a damped slot's q/k is renormalized:
damping shifts a gist's weight from fast to slow frequencies; it does not make the gist quieter.
"""

import math

import torch

from nanochat.gpt import rotary_inv_freq
from nanochat.megacontext import BLOCK_SIZE

SPLIT = 4096  # positions below this rotate exactly as the vanilla float32 table does


def gaussian_rotary(positions, lod, head_dim, block_size=BLOCK_SIZE):
    """positions: (B, T) float64 (or float32 below 2**24; a gist's span center may be x.5); lod: (B, T) long.
    -> cos, sin: (B, T, 1, D/2) float32, each frequency damped by exp(-(sigma w)^2 / 2),
    sigma = block_size ** lod for gists, no damping for tokens."""
    device = lod.device
    positions = positions.to(device if device.type != "mps" else "cpu")  # MPS has no float64: angles on the CPU
    inv_freq = rotary_inv_freq(head_dim, positions.device)  # (D/2,)
    p = positions.double()
    hi = torch.floor(p / SPLIT) * SPLIT  # (B, T) multiples of 4096
    hi_angles = torch.remainder(hi[..., None] * inv_freq.double(), 2 * math.pi).float()  # (B, T, D/2), exact-ish
    angles = (p - hi).float()[..., None] * inv_freq + hi_angles  # below 4096: the vanilla products, + 0.0
    cos, sin = angles.cos(), angles.sin()
    sigma = float(block_size) ** lod.float()  # (B, T)
    cos, sin, inv_freq = cos.to(device), sin.to(device), inv_freq.to(device)
    damp = torch.exp(-0.5 * (sigma[..., None] * inv_freq) ** 2)  # (B, T, D/2)
    damp = torch.where((lod == 0)[..., None], torch.ones_like(damp), damp)  # tokens: undamped, exactly
    return (cos * damp)[:, :, None, :], (sin * damp)[:, :, None, :]


def slot_rotary(model, positions, lod):
    """The `rotary` argument of model(idx, inputs_embeds=..., rotary=..., lod=...) for slots at these
    positions ((B, T) or (T,) float64) and levels ((B, T) or (T,) long): -> (cos, sin) (B, T, 1, D/2)."""
    positions, lod = torch.broadcast_tensors(positions, lod)
    positions, lod = (positions, lod) if positions.dim() == 2 else (positions[None], lod[None])
    return gaussian_rotary(positions, lod, model.config.n_embd // model.config.n_head)
