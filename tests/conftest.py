"""
Shared fixtures: a tiny but real nanochat base directory (parquet shards of real text and a
trained tokenizer), made once per test session.
"""

import os
import sys
import glob
import sysconfig
import subprocess

import pytest
import torch
import pyarrow as pa
import pyarrow.parquet as pq

os.environ.setdefault("WANDB_MODE", "disabled")


def run_fresh_python(code):
    """Run code in a new interpreter at the repository root (to see what its imports pull in);
    -> CompletedProcess with text output."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)


def stdlib_texts(n_docs=90):
    paths = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:n_docs]
    return [open(p, encoding="utf-8", errors="replace").read()[:20000] for p in paths]


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """<base> with base_data_climbmix/ (3 shards x 3 row groups, the last shard is val) and
    tokenizer/ (vocab 512). Tests that write checkpoints use their own model tag."""
    from nanochat.tokenizer import RustBPETokenizer, compute_token_bytes
    base = tmp_path_factory.mktemp("nanochat_base")
    texts = stdlib_texts()
    data_dir = base / "base_data_climbmix"
    data_dir.mkdir()
    per_shard = len(texts) // 3
    for s in range(3):
        docs = texts[s * per_shard:(s + 1) * per_shard]
        with pq.ParquetWriter(data_dir / f"shard_{s:05d}.parquet", pa.schema([("text", pa.string())])) as w:
            for g in range(3):
                w.write_table(pa.table({"text": docs[g::3]}))
    tokenizer = RustBPETokenizer.train_from_iterator(iter(texts), 512)
    tokenizer.save(str(base / "tokenizer"))
    torch.save(compute_token_bytes(tokenizer), base / "tokenizer" / "token_bytes.pt")
    return base


@pytest.fixture
def base_dir(tiny_base_dir, monkeypatch):
    """The tiny base dir, selected through the environment for this test."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tiny_base_dir))
    monkeypatch.delenv("NANOCHAT_DATASET", raising=False)
    return tiny_base_dir


def each_flipped(path, offsets):
    """For each offset, write path with one bit of that byte flipped (bit offset % 8) and yield the
    offset; the file's own bytes are back afterwards. For the fuzz tests of saved formats."""
    good = path.read_bytes()
    try:
        for offset in offsets:
            bad = bytearray(good)
            bad[offset] ^= 1 << (offset % 8)
            path.write_bytes(bytes(bad))
            yield offset
    finally:
        path.write_bytes(good)


# MegaContext checkpoints for the chat and CK tests

def save_without_digest(obj, path):
    """torch.save as another writer (upstream, a hand edit) would: no .sha256 beside the file, so
    the loaders' own checks, not the digest, meet what it holds."""
    torch.save(obj, path)
    if os.path.exists(f"{path}.sha256"):
        os.remove(f"{path}.sha256")


def jitter(params, scale):
    """Add scale * N(0, 1) noise to every parameter: the inits' zero projections would make layers no-ops."""
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn_like(p))


MC = dict(w_max=96, max_level=1, recent_tokens=16, gist_kind="mlp", gist_pooling="mean", lens_layers=1, lens_hidden=32)


def save_mc_checkpoint(base_dir, tag, megaprediction=False, noise=0.0):
    """A tiny base checkpoint with MegaContext weights beside it, as base_train --megacontext saves them.
    noise: the scale of the noise added to every weight (jitter: the init's zero projections make every layer a no-op)."""
    from nanochat.checkpoint_manager import save_checkpoint
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.megacontext.checkpoint import build_modules, build_predictor, save_megacontext
    from nanochat.megacontext.config import MegaContextConfig
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=128, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="L")
    model = GPT(config)
    model.init_weights()
    if noise:
        jitter(model.parameters(), noise)
    mc = MegaContextConfig(**MC, **({"megaprediction": True} if megaprediction else {})).validate()
    gistnet, lensnet = build_modules(mc, config)
    directory = str(base_dir / "base_checkpoints" / tag)
    predictor = None
    if megaprediction:
        predictor = build_predictor(mc, config)
    save_megacontext(directory, 5, mc, gistnet, lensnet, predictor=predictor)
    save_checkpoint(directory, 5, model.state_dict(), None, {"step": 5, "model_config": config.to_dict(), "megacontext": mc.to_dict()})


# Which dtypes the heavy ops ran in (the CPU dtype policy of nanochat/common.py)

HEAVY_OPS = ("mm", "bmm", "addmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_flash_attention_for_cpu_backward")  # what a CPU training step dispatches


def heavy_op_dtypes(fn):
    """Run fn() and return {(op name, dtype)} for every matmul / attention kernel it dispatched."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[-1]
            if name in HEAVY_OPS:
                for a in args:
                    if torch.is_tensor(a) and a.is_floating_point():
                        self.seen.add((name, a.dtype))
            return func(*args, **(kwargs or {}))

    with Record() as mode:
        fn()
    return mode.seen


# a tiny MegaContext model for the evaluation and refocus tests

def tiny(max_level=1, w_max=64, seed=0, vocab_size=256, **mc):
    """A real GPT (n_embd 64, 2 layers) with weights jittered off the init (whose zero projections
    would make every layer a no-op), and fresh GistNet / LensNet."""
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.megacontext.checkpoint import build_modules
    from nanochat.megacontext.config import MegaContextConfig
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=256, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SL")
    model = GPT(config)
    model.init_weights()
    jitter(model.parameters(), 0.05)
    cfg = MegaContextConfig(w_max=w_max, max_level=max_level, recent_tokens=32, horizon=32, gist_layers=1, lens_layers=1,
                            lens_hidden=64, **mc).validate()
    gistnet, lensnet = build_modules(cfg, config)
    return model, gistnet, lensnet, cfg


def loud(lensnet, gain=50.0):
    """Saturate LensNet's tanh so that most entries score beyond the allocator's thresholds."""
    with torch.no_grad():
        lensnet.head.weight.mul_(gain)
    return lensnet
