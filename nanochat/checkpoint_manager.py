"""
Checkpoints in upstream nanochat's layout:
<base>/{base,chatsft,chatrl}_checkpoints/<model_tag>/model_<step:06d>.pt   (plain state_dict)
                                                    meta_<step:06d>.json
                                                    optim_<step:06d>_rank<r>.pt
Every file is written atomically (temp name, then rename).
"""

import os
import re
import json
import dataclasses

import torch

from nanochat.common import (UserError, get_base_dir, atomic_torch_save, atomic_write_json, compute_dtype, print0,
                             load_torch_file, check_state_dict, STALE_TEMP)
from nanochat.gpt import GPT, GPTConfig

SOURCE_DIRS = {"base": "base_checkpoints", "sft": "chatsft_checkpoints", "rl": "chatrl_checkpoints"}
# bounds no real model reaches; past them a meta is damaged (10^15 layers would hang building the model)
MAX_SIZES = dict(sequence_len=1 << 16, vocab_size=1 << 24, n_layer=1 << 10, n_embd=1 << 16)  # rotary tables: 10x sequence_len


def unmark_step(checkpoint_dir, step):
    """Remove a step's meta before any of its files is written again (a run saving over a step it shares with
    an earlier one): a save killed midway then leaves an incomplete step, which every loader skips, never the
    old meta beside new weights."""
    meta_path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0):
    """Each file atomically; the meta last, so a step with a meta is a complete checkpoint (an old meta of the
    step goes first). With per-rank optimizer files every rank calls this: they all wait until each has written
    its own, then rank 0 writes the model and the meta (else a rank killed mid-save would leave a complete-looking
    step it cannot resume)."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if rank == 0:
        unmark_step(checkpoint_dir, step)
    if optimizer_data is not None:
        if distributed:  # no rank rewrites its file of the step while the old meta still marks it complete
            torch.distributed.barrier()
        atomic_torch_save(optimizer_data, os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank:d}.pt"))
        if distributed:
            torch.distributed.barrier()
    if rank == 0:
        atomic_torch_save(model_data, os.path.join(checkpoint_dir, f"model_{step:06d}.pt"))
        atomic_write_json(meta_data, os.path.join(checkpoint_dir, f"meta_{step:06d}.json"))


def model_config_from_meta(meta, meta_path):
    """The GPTConfig a checkpoint meta describes, every field checked first (known key, type, range)."""
    config = meta.get("model_config") if isinstance(meta, dict) else None
    if not isinstance(config, dict):
        raise UserError(f"{meta_path}: model_config missing or not a JSON object")
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    for key, value in config.items():
        if key not in known:
            raise UserError(f"{meta_path}: model_config.{key} is not a model setting (expected {', '.join(sorted(known))})")
        if key == "window_pattern":
            if not (isinstance(value, str) and re.fullmatch("[SLsl]+", value)):
                raise UserError(f"{meta_path}: model_config.window_pattern must be a string of S and L, got {value!r}")
        elif type(value) is not int or value < 1:
            raise UserError(f"{meta_path}: model_config.{key} must be a positive integer, got {value!r}")
    c = GPTConfig(**config)
    for key, limit in MAX_SIZES.items():
        if getattr(c, key) > limit:
            raise UserError(f"{meta_path}: model_config.{key} {getattr(c, key):,} is above {limit:,}")
    if c.n_head > c.n_embd or c.n_embd % c.n_head or (c.n_embd // c.n_head) % 2 or c.n_head % c.n_kv_head:
        raise UserError(f"{meta_path}: model_config n_embd {c.n_embd} / n_head {c.n_head} / n_kv_head {c.n_kv_head} "
                        "must give an even head_dim and n_head a multiple of n_kv_head")
    return c


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """-> (model_data, optim_data or None, meta)"""
    model_path = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
    model_data = check_state_dict(load_torch_file(model_path, device), model_path)
    optim_data = load_torch_file(os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank:d}.pt"), device) if load_optimizer else None
    meta_path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise UserError(f"checkpoint meta not found: {meta_path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"corrupt checkpoint meta {meta_path}: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    return model_data, optim_data, meta


def prepare_state_dict(model_data, device):
    """Strip torch.compile's `_orig_mod.` prefix; on CPU/MPS upcast bf16 tensors to fp32."""
    prefix = "_orig_mod."
    out = {}
    for k, v in model_data.items():
        k = k[len(prefix):] if k.startswith(prefix) else k
        if torch.device(device).type in ("cpu", "mps") and v.dtype == torch.bfloat16:
            v = v.float()
        out[k] = v
    return out


def build_model(checkpoint_dir, step, device, phase):
    """-> (model, tokenizer, meta): the GPT rebuilt from the meta's model_config, weights
    loaded strictly, embeddings in the device's compute dtype, checked against the tokenizer."""
    from nanochat.tokenizer import get_tokenizer
    assert phase in ("train", "eval"), f"phase must be train or eval, got {phase!r}"
    device = torch.device(device)
    model_data, _, meta = load_checkpoint(checkpoint_dir, step, device)
    config = model_config_from_meta(meta, os.path.join(checkpoint_dir, f"meta_{step:06d}.json"))
    model_data = prepare_state_dict(model_data, device)
    with torch.device("meta"):
        model = GPT(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}  # nothing allocated yet
    found = {k: tuple(v.shape) for k, v in model_data.items()}
    if expected != found:  # checked before allocating, so a meta claiming a huge model allocates nothing
        diff = sorted(set(expected.items()) ^ set(found.items()))[0][0]
        raise UserError(f"checkpoint in {checkpoint_dir} does not match its model_config: {diff} is "
                        f"{found.get(diff, 'missing')} in the weights, {expected.get(diff, 'unexpected')} in the config")
    kind = next((f"{k} holds {v.dtype} values" for k, v in model_data.items() if not v.is_floating_point()), None)
    if kind:  # load_state_dict's own refusal is a traceback about requires_grad
        raise UserError(f"checkpoint in {checkpoint_dir} is not a model's weights: {kind}")
    model.to_empty(device=device)
    model.init_rotary()
    model.load_state_dict(model_data, strict=True, assign=True)
    for name, p in model.named_parameters():  # master weights are fp32; only embeddings use the compute dtype
        if p.dtype != torch.float32:
            p.data = p.data.float()
    model.cast_embeddings(compute_dtype(device.type))
    model.train() if phase == "train" else model.eval()
    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise UserError(f"vocab mismatch: tokenizer has {tokenizer.get_vocab_size()} tokens, checkpoint expects {config.vocab_size}")
    trained_with = meta.get("tokenizer_fingerprint")  # absent in upstream's checkpoints and older ones: not checked
    if trained_with is not None and trained_with != tokenizer.fingerprint():
        raise UserError(f"{checkpoint_dir} step {step} was trained with another tokenizer (fingerprint {trained_with}; the one in "
                        f"{os.path.join(get_base_dir(), 'tokenizer')} is {tokenizer.fingerprint()}): restore that tokenizer or train again")
    return model, tokenizer, meta


def find_largest_model(checkpoints_dir):
    """The model tag with the largest depth d<N>; otherwise the most recently modified tag."""
    if not os.path.isdir(checkpoints_dir):
        raise UserError(f"no checkpoints directory: {checkpoints_dir} (train a model first)")
    tags = [t for t in os.listdir(checkpoints_dir) if os.path.isdir(os.path.join(checkpoints_dir, t))]
    if not tags:
        raise UserError(f"no checkpoints in {checkpoints_dir} (train a model first)")
    depths = [(int(m.group(1)), t) for t in tags if (m := re.fullmatch(r"d(\d+)", t))]
    if depths:
        return max(depths)[1]
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(checkpoints_dir, t)))


def find_last_step(checkpoint_dir):
    """The last step with both model_<step>.pt and meta_<step>.json (a crash between the two
    leaves an incomplete newest step, which is skipped)."""
    files = set(os.listdir(checkpoint_dir)) if os.path.isdir(checkpoint_dir) else set()
    steps = [int(m.group(1)) for f in files if (m := re.fullmatch(r"model_(\d+)\.pt", f)) and f"meta_{m.group(1)}.json" in files]
    if not steps:
        partial = sorted(f for f in files if STALE_TEMP.fullmatch(f) or re.fullmatch(r"(model|optim)_\d+.*\.pt", f))
        why = f" (a save was interrupted: {', '.join(partial[:3])}{' ...' if len(partial) > 3 else ''}; train again)" if partial else ""
        raise UserError(f"no complete checkpoint (model_<step>.pt + meta_<step>.json) in {checkpoint_dir}{why}")
    return max(steps)


CHECKPOINT_FILE = re.compile(r"(model|meta|optim|mc)_(\d{6})(_rank\d+)?\.(pt|json)(\.sha256)?")  # a step's files and digests


def checkpoint_steps(checkpoint_dir, after=-1):
    """The steps above `after` that have any file (model, meta, optimizer, MegaContext, digest) in checkpoint_dir."""
    files = os.listdir(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
    return sorted({int(m.group(2)) for f in files if (m := CHECKPOINT_FILE.fullmatch(f)) and int(m.group(2)) > after})


def claim_checkpoint_dir(checkpoint_dir, overwrite, rank=0, resumable=False):
    """Before a fresh (not resumed) run: a dir holding an earlier run's checkpoints is refused in one line
    unless `overwrite`. Left beside the new run, an older run's later step would stay the last one that
    every loader picks. -> the steps the new run replaces, removed once it has saved its own
    (retire_checkpoints), so a run stopped before its first save leaves the old model in place (it may be
    the very one this run started from); its log is replaced as training starts (RunLog(fresh=True))."""
    steps = checkpoint_steps(checkpoint_dir)
    if steps and not overwrite:
        resume = ", --resume-from-step <step> continues that run" if resumable else ""
        raise UserError(f"{checkpoint_dir} already holds a run's checkpoints (steps {', '.join(map(str, steps))}): "
                        f"--overwrite replaces them{resume}, or train under another --model-tag")
    if not steps:
        return []
    print0(f"--overwrite: this run replaces the checkpoints in {checkpoint_dir} (steps {', '.join(map(str, steps))}; "
           "they are removed once it has saved its own)")
    return steps


def retire_checkpoints(checkpoint_dir, steps, saved_step, rank=0):
    """After a run's first save (at saved_step): remove the files of `steps`, the earlier run's that it
    replaces (claim_checkpoint_dir) or, when resumed, the abandoned steps past its start; rank 0 only.
    A step the run has just saved over is kept. -> [] (nothing left to retire)"""
    gone = [s for s in steps if s != saved_step]
    if rank == 0 and gone:
        for f in os.listdir(checkpoint_dir):
            m = CHECKPOINT_FILE.fullmatch(f)
            if m and int(m.group(2)) in gone:
                os.remove(os.path.join(checkpoint_dir, f))
        print0(f"removed the replaced checkpoints (steps {', '.join(map(str, gone))}) from {checkpoint_dir}")
    return []


def resolve_checkpoint(source, model_tag=None, step=None):
    """-> (checkpoint_dir, model_tag, step) for source in {"base", "sft", "rl"}: the tag defaults to
    the largest d<N>, the step to the last complete one (for scripts that name outputs after them)."""
    if source not in SOURCE_DIRS:
        raise UserError(f"unknown checkpoint source {source!r} (expected one of {', '.join(SOURCE_DIRS)})")
    checkpoints_dir = os.path.join(get_base_dir(), SOURCE_DIRS[source])
    model_tag = model_tag or find_largest_model(checkpoints_dir)
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    if not os.path.isdir(checkpoint_dir):
        raise UserError(f"no checkpoint directory {checkpoint_dir}")
    return checkpoint_dir, model_tag, find_last_step(checkpoint_dir) if step is None else step


def load_model(source, device, phase, model_tag=None, step=None):
    """-> (model, tokenizer, meta) for source in {"base", "sft", "rl"}; tag defaults to the
    largest d<N>, step to the last one."""
    checkpoint_dir, model_tag, step = resolve_checkpoint(source, model_tag, step)
    print0(f"loading {source} model {model_tag} step {step} from {checkpoint_dir}")
    return build_model(checkpoint_dir, step, device, phase)
