"""
An independent, deliberately plain reading of the upstream nanochat model and its on-disk
layout, written straight from the spec (shared/spec/nanochat-baseline.md, "Model" and
"Directories"), used as the fixture for tests/test_upstream_compat.py.

Nothing here imports nanochat.gpt or nanochat.checkpoint_manager: the point is to have a
second implementation that agrees with the spec, so that the project's model is checked
against the spec and not against itself. Slow and simple on purpose: explicit loops over
layers, an explicit boolean window mask, kv heads repeated for GQA, rotary from the formula.

What upstream writes, and what this module imitates:
- <dir>/model_<step:06d>.pt: a plain state_dict; keys carry a leading `_orig_mod.` (the
  model was torch.compile'd) and the embeddings (wte, value_embeds) are bf16 (a GPU run
  stores embeddings in the compute dtype); every linear weight and scalar is fp32.
- <dir>/meta_<step:06d>.json: the base meta keys, model_config = the GPTConfig fields.
- <dir>/optim_<step:06d>_rank0.pt: the optimizer state (never read when loading for eval).
- <base>/tokenizer/tokenizer.pkl (a pickled tiktoken.Encoding) and token_bytes.pt.
"""

import os
import json
import math
import pickle

import torch

MODEL_CONFIG_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")
BASE_META_KEYS = ("step", "val_bpb", "model_config", "user_config", "device_batch_size", "max_seq_len",
                  "total_batch_size", "dataloader_state_dict", "loop_state")
SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
ROTARY_BASE = 100000
SMEAR_CHANNELS = 24  # smear_gate reads x[t, :24]
VE_GATE_CHANNELS = 12  # ve_gate reads x[..., :12]
QK_SCALE = 1.2  # q and k are multiplied by this after their rms-norm
SOFTCAP = 15.0


# -----------------------------------------------------------------------------
# Shapes and per-layer structure

def padded_vocab(vocab_size):
    return math.ceil(vocab_size / 64) * 64


def head_dim(config):
    return config["n_embd"] // config["n_head"]


def has_value_embedding(i, n_layer):
    # alternating layers, the last one always included
    return i % 2 == (n_layer - 1) % 2


def window_sizes(config):
    """Per-layer window w (query i sees key j iff 0 <= i-j <= w); pattern tiled, last layer L."""
    long_w = config["sequence_len"]
    short_w = math.ceil(config["sequence_len"] / 4 / 128) * 128
    pattern = config["window_pattern"]
    sizes = []
    for i in range(config["n_layer"]):
        ch = pattern[i % len(pattern)]
        assert ch in "SL", f"bad window pattern char {ch!r}"
        sizes.append(short_w if ch == "S" else long_w)
    sizes[-1] = long_w
    return sizes


def expected_shapes(config):
    """The spec's full state-dict key list -> shape (no `_orig_mod.` prefix, no buffers)."""
    C, V = config["n_embd"], padded_vocab(config["vocab_size"])
    H, KV, D, n = config["n_head"], config["n_kv_head"], head_dim(config), config["n_layer"]
    shapes = {"transformer.wte.weight": (V, C)}
    for i in range(n):
        p = f"transformer.h.{i}."
        shapes[p + "attn.c_q.weight"] = (H * D, C)
        shapes[p + "attn.c_k.weight"] = (KV * D, C)
        shapes[p + "attn.c_v.weight"] = (KV * D, C)
        shapes[p + "attn.c_proj.weight"] = (C, H * D)
        if has_value_embedding(i, n):
            shapes[p + "attn.ve_gate.weight"] = (KV, VE_GATE_CHANNELS)
        shapes[p + "mlp.c_fc.weight"] = (4 * C, C)
        shapes[p + "mlp.c_proj.weight"] = (C, 4 * C)
    shapes["lm_head.weight"] = (V, C)
    shapes["resid_lambdas"] = (n,)
    shapes["x0_lambdas"] = (n,)
    shapes["smear_gate.weight"] = (1, SMEAR_CHANNELS)
    shapes["smear_lambda"] = (1,)
    shapes["backout_lambda"] = (1,)
    for i in range(n):
        if has_value_embedding(i, n):
            shapes[f"value_embeds.{i}.weight"] = (V, KV * D)
    return shapes


def is_embedding_key(key):
    return key == "transformer.wte.weight" or key.startswith("value_embeds.")


# -----------------------------------------------------------------------------
# Random, non-trivial weights: every parameter is far from zero/one so that each term of
# the forward pass moves the logits (zero c_proj or smear_lambda would hide bugs).

def random_state_dict(config, seed):
    g = torch.Generator().manual_seed(seed)
    n = config["n_layer"]

    def uniform(shape, bound):
        return (torch.rand(shape, generator=g) * 2 - 1) * bound

    sd = {}
    for key, shape in expected_shapes(config).items():
        if key.endswith(("c_q.weight", "c_k.weight", "c_v.weight", "c_fc.weight", "c_proj.weight")):
            sd[key] = uniform(shape, math.sqrt(3 / shape[1]))  # unit-variance outputs
        elif key == "lm_head.weight":
            sd[key] = torch.randn(shape, generator=g) * (2.0 / math.sqrt(shape[1]))  # logits ~ N(0, 4), below the softcap
        elif is_embedding_key(key):
            sd[key] = torch.randn(shape, generator=g)
        elif key.endswith("ve_gate.weight") or key == "smear_gate.weight":
            sd[key] = torch.randn(shape, generator=g) * 0.5
        elif key == "resid_lambdas":
            sd[key] = 1.0 + uniform((n,), 0.3)
        elif key == "x0_lambdas":
            sd[key] = 0.3 + uniform((n,), 0.2)
        elif key == "smear_lambda":
            sd[key] = 0.6 + uniform((1,), 0.2)
        elif key == "backout_lambda":
            sd[key] = 0.3 + uniform((1,), 0.1)
        else:
            raise AssertionError(f"no init rule for {key}")
    return sd


def reference_init(config, seed):
    """Upstream's init_weights as its draws come, one generator seeded once: wte N(0, 0.8), lm_head
    N(0, 0.001), per layer c_q, c_k, c_v U(+-s) (c_proj zero) and c_fc U(+-0.4s) (mlp c_proj zero), the
    lambdas (no draw), smear_gate U(0, 0.02), the value embeddings in layer order U(+-s), then the ve_gates
    in layer order U(0, 0.02); s = sqrt(3 / n_embd)."""
    g = torch.Generator().manual_seed(seed)
    shapes, n, s = expected_shapes(config), config["n_layer"], math.sqrt(3 / config["n_embd"])
    sd = {}

    def draw(key, kind, a, b):
        t = torch.empty(shapes[key])
        sd[key] = t.normal_(a, b, generator=g) if kind == "normal" else t.uniform_(a, b, generator=g)

    draw("transformer.wte.weight", "normal", 0.0, 0.8)
    draw("lm_head.weight", "normal", 0.0, 0.001)
    for i in range(n):
        p = f"transformer.h.{i}."
        for name in ("attn.c_q", "attn.c_k", "attn.c_v"):
            draw(p + name + ".weight", "uniform", -s, s)
        sd[p + "attn.c_proj.weight"] = torch.zeros(shapes[p + "attn.c_proj.weight"])
        draw(p + "mlp.c_fc.weight", "uniform", -0.4 * s, 0.4 * s)
        sd[p + "mlp.c_proj.weight"] = torch.zeros(shapes[p + "mlp.c_proj.weight"])
    sd["resid_lambdas"] = torch.tensor([1.15 - 0.10 * i / max(n - 1, 1) for i in range(n)])
    sd["x0_lambdas"] = torch.tensor([0.20 - 0.15 * i / max(n - 1, 1) for i in range(n)])
    sd["smear_lambda"], sd["backout_lambda"] = torch.zeros(1), torch.full((1,), 0.2)
    draw("smear_gate.weight", "uniform", 0.0, 0.02)
    for i in range(n):
        if has_value_embedding(i, n):
            draw(f"value_embeds.{i}.weight", "uniform", -s, s)
    for i in range(n):
        if has_value_embedding(i, n):
            draw(f"transformer.h.{i}.attn.ve_gate.weight", "uniform", 0.0, 0.02)
    return sd


# -----------------------------------------------------------------------------
# The reference forward pass

def rms_norm(x):
    # parameter-free RMSNorm over the last dim, eps as F.rms_norm's default for fp32
    eps = torch.finfo(x.dtype).eps
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def rotary(x, positions):
    """x (B, T, H, D); rotate halves: y1 = x1*cos + x2*sin, y2 = -x1*sin + x2*cos."""
    D = x.size(-1)
    inv_freq = ROTARY_BASE ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)  # (D/2,)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    cos = angles.cos()[None, :, None, :]  # (1, T, 1, D/2)
    sin = angles.sin()[None, :, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


def window_mask(T, w):
    """(T, T) bool, True where query i may attend key j: 0 <= i - j <= w."""
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    return (i - j >= 0) & (i - j <= w)


def attention(x, idx, sd, config, layer, w):
    """x: the block's normed input (B, T, C) -> (B, T, C)."""
    B, T, C = x.shape
    H, KV, D = config["n_head"], config["n_kv_head"], head_dim(config)
    p = f"transformer.h.{layer}.attn."
    q = (x @ sd[p + "c_q.weight"].T).view(B, T, H, D)
    k = (x @ sd[p + "c_k.weight"].T).view(B, T, KV, D)
    v = (x @ sd[p + "c_v.weight"].T).view(B, T, KV, D)
    if has_value_embedding(layer, config["n_layer"]):
        ve = sd[f"value_embeds.{layer}.weight"][idx].view(B, T, KV, D)
        gate = 3 * torch.sigmoid(x[..., :VE_GATE_CHANNELS] @ sd[p + "ve_gate.weight"].T)  # (B, T, KV)
        v = v + gate[..., None] * ve
    pos = torch.arange(T)
    q, k = rotary(q, pos), rotary(k, pos)
    q, k = rms_norm(q) * QK_SCALE, rms_norm(k) * QK_SCALE
    # GQA: query head h reads kv head h // (H // KV)
    group = H // KV
    k = torch.stack([k[:, :, h // group] for h in range(H)], dim=2)  # (B, T, H, D)
    v = torch.stack([v[:, :, h // group] for h in range(H)], dim=2)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)  # (B, H, T, T)
    scores = scores.masked_fill(~window_mask(T, w), float("-inf"))
    y = torch.softmax(scores, dim=-1) @ v  # (B, H, T, D)
    y = y.transpose(1, 2).reshape(B, T, H * D)
    return y @ sd[p + "c_proj.weight"].T


def mlp(x, sd, layer):
    p = f"transformer.h.{layer}.mlp."
    h = torch.relu(x @ sd[p + "c_fc.weight"].T) ** 2
    return h @ sd[p + "c_proj.weight"].T


@torch.no_grad()
def reference_forward(state_dict, config, idx):
    """state_dict: spec key names (no prefix), any float dtype; idx (B, T) int64 -> fp32 logits (B, T, vocab)."""
    sd = {k: v.float() for k, v in state_dict.items()}
    n = config["n_layer"]
    B, T = idx.shape
    x = rms_norm(sd["transformer.wte.weight"][idx])  # (B, T, C)
    # smear: x[t] += smear_lambda * sigmoid(smear_gate(x[t, :24])) * x[t-1], all from the pre-smear x
    gate = torch.sigmoid(x[:, 1:, :SMEAR_CHANNELS] @ sd["smear_gate.weight"].T)  # (B, T-1, 1)
    smeared = x.clone()
    smeared[:, 1:] = x[:, 1:] + sd["smear_lambda"] * gate * x[:, :-1]
    x = smeared
    x0 = x
    x_mid = None
    for i, w in enumerate(window_sizes(config)):
        x = sd["resid_lambdas"][i] * x + sd["x0_lambdas"][i] * x0
        x = x + attention(rms_norm(x), idx, sd, config, i, w)
        x = x + mlp(rms_norm(x), sd, i)
        if i == n // 2:
            x_mid = x
    x = x - sd["backout_lambda"] * x_mid
    logits = (rms_norm(x) @ sd["lm_head.weight"].T)[..., : config["vocab_size"]].float()
    return SOFTCAP * torch.tanh(logits / SOFTCAP)


# -----------------------------------------------------------------------------
# Writing an upstream-style checkpoint directory and tokenizer directory

def base_meta(step, config):
    return {
        "step": step,
        "val_bpb": 3.21,
        "model_config": {k: config[k] for k in MODEL_CONFIG_FIELDS},
        "user_config": {"run": "dummy", "depth": config["n_layer"], "window_pattern": config["window_pattern"]},
        "device_batch_size": 4,
        "max_seq_len": config["sequence_len"],
        "total_batch_size": 4 * config["sequence_len"],
        "dataloader_state_dict": {"pq_idx": 0, "rg_idx": 3, "epoch": 1},
        "loop_state": {"min_val_bpb": 3.2, "smooth_train_loss": 4.5, "total_training_time": 12.5},
    }


def write_upstream_checkpoint(checkpoint_dir, step, config, seed):
    """Write model/meta/optim files as an upstream (compiled, bf16 GPU) run would. Returns the
    state dict (spec keys, fp32) holding exactly the values a loader should end up with:
    the bf16 embeddings upcast to fp32."""
    sd = random_state_dict(config, seed)
    stored = {}
    for k, v in sd.items():
        stored["_orig_mod." + k] = v.to(torch.bfloat16) if is_embedding_key(k) else v
    os.makedirs(checkpoint_dir, exist_ok=True)
    torch.save(stored, os.path.join(checkpoint_dir, f"model_{step:06d}.pt"))
    with open(os.path.join(checkpoint_dir, f"meta_{step:06d}.json"), "w", encoding="utf-8") as f:
        json.dump(base_meta(step, config), f, indent=2)
    optim = {"state": {0: {"step": torch.tensor(float(step))}}, "param_groups": [{"lr": 0.02, "params": [0]}]}
    torch.save([optim, optim], os.path.join(checkpoint_dir, f"optim_{step:06d}_rank0.pt"))
    return {k: v.float() for k, v in ((k[len("_orig_mod."):], v) for k, v in stored.items())}


def write_upstream_tokenizer(tokenizer_dir, texts, vocab_size):
    """Train with rustbpe, pickle a tiktoken.Encoding and write token_bytes.pt. Returns the Encoding."""
    import rustbpe
    import tiktoken
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    mergeable_ranks = {bytes(b): r for b, r in bpe.get_mergeable_ranks()}
    offset = len(mergeable_ranks)
    special = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="rustbpe", pat_str=bpe.get_pattern(), mergeable_ranks=mergeable_ranks,
                            special_tokens=special)
    assert enc.n_vocab == vocab_size, (enc.n_vocab, vocab_size)
    os.makedirs(tokenizer_dir, exist_ok=True)
    with open(os.path.join(tokenizer_dir, "tokenizer.pkl"), "wb") as f:
        pickle.dump(enc, f)
    special_ids = set(special.values())
    token_bytes = [0 if i in special_ids else len(enc.decode_single_token_bytes(i)) for i in range(vocab_size)]
    torch.save(torch.tensor(token_bytes, dtype=torch.int32), os.path.join(tokenizer_dir, "token_bytes.pt"))
    return enc


# -----------------------------------------------------------------------------
# The pretraining loader's order (nanochat/dataloader.py upstream), as plain lists

def reference_bestfit_rows(paths, tokenizer, B, T, rank=0, world_size=1, chunk=128, buffer_size=1000):
    """Yield batches of B rows of T+1 token ids as upstream's best-fit loader packs them: each file's row
    groups rank, rank + world_size, ... in turn, `chunk` documents tokenized (BOS first) per refill, the
    buffer topped up while it holds fewer than buffer_size; a row takes the first document of the largest
    length that fits, else the first shortest, cropped to the space left."""
    import pyarrow.parquet as pq

    def documents():
        while True:  # epochs
            for path in paths:
                pf = pq.ParquetFile(path)
                for rg in range(rank, pf.num_row_groups, world_size):
                    texts = pf.read_row_group(rg).column("text").to_pylist()
                    for i in range(0, len(texts), chunk):
                        yield texts[i:i + chunk]

    source, buffer = documents(), []
    while True:
        rows = []
        for _ in range(B):
            row = []
            while len(row) < T + 1:
                while len(buffer) < buffer_size:
                    buffer.extend(tokenizer.encode(next(source), prepend=tokenizer.get_bos_token_id()))
                space, best = T + 1 - len(row), None
                for i, doc in enumerate(buffer):
                    if len(doc) <= space and (best is None or len(doc) > len(buffer[best])):
                        best = i
                if best is not None:
                    row.extend(buffer.pop(best))
                else:
                    shortest = min(range(len(buffer)), key=lambda i: len(buffer[i]))
                    row.extend(buffer.pop(shortest)[:space])
            rows.append(row)
        yield rows
