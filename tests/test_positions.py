"""Gaussian RoPE (nanochat/megacontext/positions.py)."""

import math

import torch

from nanochat.gpt import GPT, GPTConfig, rotary_inv_freq
from nanochat.megacontext.positions import gaussian_rotary


def test_token_slots_rotate_exactly_like_the_vanilla_table():
    head_dim, T = 16, 50
    model = GPT(GPTConfig(sequence_len=64, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32))
    model.init_rotary()
    cos, sin = gaussian_rotary(torch.arange(T, dtype=torch.float32)[None], torch.zeros(1, T, dtype=torch.long), head_dim)
    assert torch.equal(cos, model.cos[:, :T]) and torch.equal(sin, model.sin[:, :T])


def test_gists_are_damped_by_their_own_block_scale():
    """sigma = 32**lod (a gist's span), never the WC length: failure mode 5."""
    head_dim = 64
    w = rotary_inv_freq(head_dim).double()
    pos = torch.tensor([[1000.5, 2047.5, 500.0]])
    lod = torch.tensor([[1, 2, 0]])
    cos, sin = gaussian_rotary(pos, lod, head_dim)
    for t, sigma in [(0, 32.0), (1, 1024.0), (2, None)]:
        damp = torch.ones_like(w) if sigma is None else torch.exp(-0.5 * (sigma * w) ** 2)
        angle = pos[0, t].double() * w
        assert torch.allclose(cos[0, t, 0].double(), angle.cos() * damp, atol=1e-5)
        assert torch.allclose(sin[0, t, 0].double(), angle.sin() * damp, atol=1e-5)
    # LOD1 keeps the slow frequencies nearly intact and kills the fastest: coarse position only
    mag1 = (cos[0, 0, 0] ** 2 + sin[0, 0, 0] ** 2).sqrt()
    assert mag1[0] < 1e-6 and mag1[-1] > 0.99
    mag2 = (cos[0, 1, 0] ** 2 + sin[0, 1, 0] ** 2).sqrt()
    assert (mag2 <= mag1 + 1e-7).all() and (mag2 < mag1).any()  # deeper gists are blurrier


def test_positions_far_beyond_training_length_stay_precise():
    head_dim = 16
    p = torch.tensor([[10_000_000.0, 10_000_001.0]])
    cos, sin = gaussian_rotary(p, torch.zeros(1, 2, dtype=torch.long), head_dim)
    w = rotary_inv_freq(head_dim).double()
    for t in range(2):
        angle = p[0, t].double() * w.float().double()  # float32 frequencies, as the model uses them
        assert torch.allclose(cos[0, t, 0].double(), angle.cos(), atol=1e-3)
        assert torch.allclose(sin[0, t, 0].double(), angle.sin(), atol=1e-3)
    assert math.isfinite(cos.sum().item())
