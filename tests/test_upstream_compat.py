"""
Compatibility with upstream nanochat, both ways (spec: "Model" and "Directories"):
- a checkpoint dir + tokenizer dir as upstream writes them (compiled-model `_orig_mod.` keys,
  bf16 embeddings, pickled tiktoken.Encoding) load through checkpoint_manager.load_model and
  give the logits of an independent reference forward (tests/upstream_reference.py), fp32 CPU, 1e-4;
- a checkpoint this project writes has exactly upstream's state-dict keys/shapes and meta, and
  the reference forward on it reproduces our model's logits;
- the loader's defaults: largest d<N> tag, last step.
"""

import os
import sys
import json
import dataclasses

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import upstream_reference as ref  # noqa: E402

from nanochat.gpt import GPT, GPTConfig  # noqa: E402
from nanochat.checkpoint_manager import load_model, save_checkpoint  # noqa: E402
from nanochat.tokenizer import get_token_bytes  # noqa: E402

VOCAB = 309  # 300 BPE tokens + 9 specials; not a multiple of 64, so padding to 320 is exercised
ATOL = 1e-4

# sequence_len 256 -> S window = ceil(256/4/128)*128 = 128, so T > 129 really masks on S layers
CONFIGS = {
    "2L-mha-SL": dict(sequence_len=256, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=4, n_embd=64, window_pattern="SL"),
    "3L-gqa-SSSL": dict(sequence_len=256, vocab_size=VOCAB, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SSSL"),
    "4L-mqa-SSL": dict(sequence_len=256, vocab_size=VOCAB, n_layer=4, n_head=3, n_kv_head=1, n_embd=96, window_pattern="SSL"),
}
SEQ_LENS = (1, 2, 100, 129, 130, 256)  # below, at and above the S window; up to sequence_len


def corpus():
    words = "the quick brown fox jumps over a lazy dog while seven wizards hex many jolly boxers".split()
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + f" {i * 37}!\n" for i in range(300)]


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    """A fresh NANOCHAT_BASE_DIR holding an upstream-style tokenizer dir."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    enc = ref.write_upstream_tokenizer(os.path.join(tmp_path, "tokenizer"), corpus(), VOCAB)
    return tmp_path, enc


def random_ids(B, T, seed):
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_logits_close(got, want):
    assert got.dtype == torch.float32 and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    err = (got - want).abs().max().item()
    assert err < ATOL, f"max |logit diff| {err:.3g} >= {ATOL}"


# -----------------------------------------------------------------------------
# The fixture itself: every term of the forward pass moves the logits, and the configs
# above really exercise the short windows. Otherwise agreement below would prove little.

def test_reference_every_parameter_matters():
    cfg = CONFIGS["3L-gqa-SSSL"]
    sd = ref.random_state_dict(cfg, seed=1)
    idx = random_ids(2, 200, seed=2)
    base = ref.reference_forward(sd, cfg, idx)
    for key in sd:
        bumped = dict(sd)
        bumped[key] = sd[key] * 1.1 + 0.05
        delta = (ref.reference_forward(bumped, cfg, idx) - base).abs().max().item()
        assert delta > 100 * ATOL, f"{key} barely moves the logits ({delta:.3g})"


def test_reference_short_windows_mask_only_beyond_S():
    cfg = CONFIGS["2L-mha-SL"]
    all_long = dict(cfg, window_pattern="L")
    sd = ref.random_state_dict(cfg, seed=3)
    assert ref.window_sizes(cfg) == [128, 256] and ref.window_sizes(all_long) == [256, 256]
    assert ref.window_sizes(dict(cfg, n_layer=5, window_pattern="SSL")) == [128, 128, 256, 128, 256]
    idx = random_ids(1, 200, seed=4)
    short, long = ref.reference_forward(sd, cfg, idx), ref.reference_forward(sd, all_long, idx)
    assert torch.equal(short[:, :129], long[:, :129])  # i - j <= 128 everywhere: same attention
    assert (short[:, 129:] - long[:, 129:]).abs().max() > 100 * ATOL


def test_reference_padding_and_ve_layers():
    cfg = CONFIGS["4L-mqa-SSL"]
    shapes = ref.expected_shapes(cfg)
    assert shapes["transformer.wte.weight"] == (320, 96) and shapes["lm_head.weight"] == (320, 96)
    assert [k for k in shapes if k.startswith("value_embeds.")] == ["value_embeds.1.weight", "value_embeds.3.weight"]
    assert shapes["value_embeds.3.weight"] == (320, 32)
    assert shapes["transformer.h.1.attn.ve_gate.weight"] == (1, 12)
    assert "transformer.h.0.attn.ve_gate.weight" not in shapes
    three = ref.expected_shapes(CONFIGS["3L-gqa-SSSL"])
    assert [k for k in three if k.startswith("value_embeds.")] == ["value_embeds.0.weight", "value_embeds.2.weight"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_init_draws_upstreams_weights_for_a_seed(name):
    """Upstream draws smear_gate, then the value embeddings, then the ve_gates, after every block's
    matrices; ours drew each ve_gate inside its block and the value embeddings before smear_gate: the same
    distributions, other weights for one seed (a vanilla run here and upstream's started apart)."""
    cfg = CONFIGS[name]
    with torch.device("meta"):
        model = GPT(GPTConfig(**{k: cfg[k] for k in ref.MODEL_CONFIG_FIELDS}))
    model.to_empty(device="cpu")
    torch.manual_seed(1234)
    model.init_weights()
    want = ref.reference_init(cfg, 1234)
    got = model.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k].float(), want[k]), k


# -----------------------------------------------------------------------------
# upstream -> here

@pytest.mark.parametrize("name", list(CONFIGS))
def test_upstream_checkpoint_loads_with_same_logits(base_dir, name):
    base, enc = base_dir
    cfg = CONFIGS[name]
    ckpt_dir = os.path.join(base, "base_checkpoints", f"d{cfg['n_layer']}")
    sd = ref.write_upstream_checkpoint(ckpt_dir, 1200, cfg, seed=10)

    model, tokenizer, meta = load_model("base", "cpu", phase="eval")
    assert not model.training
    assert meta["step"] == 1200 and meta["model_config"] == {k: cfg[k] for k in ref.MODEL_CONFIG_FIELDS}
    assert tokenizer.get_vocab_size() == VOCAB
    assert all(p.dtype == torch.float32 for p in model.parameters())  # bf16 embeddings upcast on CPU
    loaded = {k: v for k, v in model.state_dict().items()}
    assert set(loaded) == set(sd)
    for k in sd:
        assert torch.equal(loaded[k].float(), sd[k]), f"{k} changed on load"

    for T in SEQ_LENS:
        idx = random_ids(2, T, seed=T)
        with torch.no_grad():
            got = model(idx)
        assert_logits_close(got, ref.reference_forward(sd, cfg, idx))


def test_upstream_tokenizer_dir_loads(base_dir):
    base, enc = base_dir
    ref.write_upstream_checkpoint(os.path.join(base, "base_checkpoints", "d2"), 5, CONFIGS["2L-mha-SL"], seed=11)
    _, tokenizer, _ = load_model("base", "cpu", phase="eval")
    text = "the lazy fox hexes 12345 boxers!\n and more"
    assert tokenizer.encode(text) == enc.encode_ordinary(text)
    assert tokenizer.decode(enc.encode_ordinary(text)) == text
    assert tokenizer.get_bos_token_id() == 300
    assert [tokenizer.encode_special(s) for s in ref.SPECIAL_TOKENS] == list(range(300, 309))
    written = torch.load(os.path.join(base, "tokenizer", "token_bytes.pt"), weights_only=True)
    assert torch.equal(get_token_bytes(), written)


def test_strict_loading_rejects_extra_and_missing_keys(base_dir):
    base, _ = base_dir
    cfg = CONFIGS["2L-mha-SL"]
    ckpt_dir = os.path.join(base, "base_checkpoints", "d2")
    ref.write_upstream_checkpoint(ckpt_dir, 7, cfg, seed=12)
    path = os.path.join(ckpt_dir, "model_000007.pt")
    good = torch.load(path, weights_only=True)

    torch.save(dict(good, **{"_orig_mod.transformer.h.0.attn.ve_gate.weight": torch.ones(4, 12)}), path)
    with pytest.raises(Exception):
        load_model("base", "cpu", phase="eval")
    missing = dict(good)
    del missing["_orig_mod.backout_lambda"]
    torch.save(missing, path)
    with pytest.raises(Exception):
        load_model("base", "cpu", phase="eval")


# -----------------------------------------------------------------------------
# here -> upstream

def perturbed_model(cfg, seed):
    """Our model, spec init, then every parameter moved off its init (c_proj and
    smear_lambda start at zero, which would hide their terms)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**cfg))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            scale = 0.5 / p.shape[-1] ** 0.5 if p.ndim == 2 else 0.2
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


@pytest.mark.parametrize("name", ["3L-gqa-SSSL", "4L-mqa-SSL"])
def test_our_checkpoint_is_upstream_shaped(base_dir, name):
    base, _ = base_dir
    cfg = CONFIGS[name]
    model = perturbed_model(cfg, seed=20)
    model_config = dataclasses.asdict(model.config)
    assert set(model_config) == set(ref.MODEL_CONFIG_FIELDS)  # upstream does GPTConfig(**model_config)
    meta = ref.base_meta(300, model_config)
    ckpt_dir = os.path.join(base, "base_checkpoints", f"d{cfg['n_layer']}")
    save_checkpoint(ckpt_dir, 300, model.state_dict(), None, meta)

    # the digest beside the weights is invisible to upstream (its loader globs model_*.pt and meta_*.json)
    assert sorted(os.listdir(ckpt_dir)) == ["meta_000300.json", "model_000300.pt", "model_000300.pt.sha256"]
    data = torch.load(os.path.join(ckpt_dir, "model_000300.pt"), map_location="cpu", weights_only=True)
    assert isinstance(data, dict) and all(isinstance(v, torch.Tensor) for v in data.values())
    want = ref.expected_shapes(cfg)
    assert set(data) == set(want), f"extra {sorted(set(data) - set(want))}, missing {sorted(set(want) - set(data))}"
    for k, shape in want.items():
        assert tuple(data[k].shape) == shape, (k, tuple(data[k].shape), shape)
        assert data[k].dtype in (torch.float32, torch.bfloat16), (k, data[k].dtype)
    with open(os.path.join(ckpt_dir, "meta_000300.json"), encoding="utf-8") as f:
        saved_meta = json.load(f)
    assert set(saved_meta) == set(ref.BASE_META_KEYS)
    assert set(saved_meta["model_config"]) == set(ref.MODEL_CONFIG_FIELDS)
    assert set(saved_meta["dataloader_state_dict"]) == {"pq_idx", "rg_idx", "epoch"}
    assert set(saved_meta["loop_state"]) == {"min_val_bpb", "smooth_train_loss", "total_training_time"}

    # upstream's reading of the file: reference forward on the saved state dict
    for T in (3, 130, 256):
        idx = random_ids(2, T, seed=100 + T)
        with torch.no_grad():
            ours = model(idx)
        assert_logits_close(ours, ref.reference_forward(data, saved_meta["model_config"], idx))

    # and our own loader round-trips it
    loaded, _, _ = load_model("base", "cpu", phase="eval")
    idx = random_ids(1, 200, seed=5)
    with torch.no_grad():
        assert_logits_close(loaded(idx), model(idx))


# -----------------------------------------------------------------------------
# loader defaults

def test_loader_picks_largest_depth_and_last_step(base_dir):
    base, _ = base_dir
    cfg = CONFIGS["2L-mha-SL"]
    root = os.path.join(base, "base_checkpoints")
    # "d12" sorts first as a string; the tag is chosen by depth, not by name or age
    ref.write_upstream_checkpoint(os.path.join(root, "d12", ""), 5, cfg, seed=30)
    ref.write_upstream_checkpoint(os.path.join(root, "d12"), 999999, cfg, seed=31)
    last = ref.write_upstream_checkpoint(os.path.join(root, "d12"), 1000000, cfg, seed=32)  # "1000000" < "999999" as text
    d3 = ref.write_upstream_checkpoint(os.path.join(root, "d3"), 2000000, cfg, seed=33)
    ref.write_upstream_checkpoint(os.path.join(root, "d9"), 10, cfg, seed=34)
    newest = os.path.join(root, "d3")
    os.utime(newest, (2e9, 2e9))  # d3 is the most recently modified tag

    idx = random_ids(1, 150, seed=6)
    model, _, meta = load_model("base", "cpu", phase="eval")
    assert meta["step"] == 1000000
    with torch.no_grad():
        assert_logits_close(model(idx), ref.reference_forward(last, cfg, idx))

    model, _, meta = load_model("base", "cpu", phase="eval", model_tag="d3")
    assert meta["step"] == 2000000
    with torch.no_grad():
        assert_logits_close(model(idx), ref.reference_forward(d3, cfg, idx))

    _, _, meta = load_model("base", "cpu", phase="eval", model_tag="d12", step=999999)
    assert meta["step"] == 999999
