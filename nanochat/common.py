"""
Small shared utilities: base directory, user-facing errors, atomic writes, printing on
rank 0, device auto-detection and torch.distributed setup.
"""

import os
import re
import sys
import json
import hashlib
import logging
import tempfile
import contextlib
import ctypes.util

import torch
import torch.distributed as dist


# -----------------------------------------------------------------------------
# Errors the user can fix (missing file, bad flag, corrupt data). Scripts turn them into
# one line on stderr and exit code 1 instead of a traceback.

class UserError(Exception):
    pass


def cli_main(main):
    """Run a script's main(); a UserError becomes a one-line message and a non-zero exit."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# -----------------------------------------------------------------------------
# Paths and atomic writes

def get_base_dir():
    """$NANOCHAT_BASE_DIR, default ~/.cache/nanochat; created if missing."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    try:
        os.makedirs(base, exist_ok=True)
    except OSError as e:  # a file in the way, no permission, a read-only disk
        raise UserError(f"cannot use {base} as the base directory (NANOCHAT_BASE_DIR): {e.strerror}") from None
    return base


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it is renamed onto `path` in one
    step, so a reader never sees a half-written file and a crash leaves the old one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the bytes reach the disk before the name points at them
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)  # and the rename itself survives a power cut
        finally:
            os.close(fd)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


DIGEST_SUFFIX = ".sha256"  # <file>.sha256 beside a checkpoint / tokenizer file, in sha256sum's format


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def commit_with_digest(write, path):
    """write(tmp) a file atomically onto path, with <path>.sha256 (`sha256sum -c` checks it) beside it.
    An old digest goes before the new file takes the name, so a kill anywhere leaves a file that is
    either checked by its own digest or has none (then it is read unchecked, as upstream's files)."""
    with atomic_path(path) as tmp:
        write(tmp)
        digest = file_sha256(tmp)
        if os.path.exists(path + DIGEST_SUFFIX):
            os.remove(path + DIGEST_SUFFIX)
    with atomic_path(path + DIGEST_SUFFIX) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"{digest}  {os.path.basename(path)}\n")


def check_digest(path, what):
    """A file with a <path>.sha256 beside it must match it: a changed byte is refused in one line."""
    digest_path = path + DIGEST_SUFFIX
    if not os.path.exists(digest_path):
        return
    with open(digest_path, "rb") as f:
        want = f.read(64).decode("ascii", "replace")
    if file_sha256(path) != want:
        raise UserError(f"{what} {path} does not match its checksum in {os.path.basename(digest_path)} "
                        f"(changed or damaged since it was saved; if you replaced it on purpose, delete {digest_path})")


def atomic_torch_save(obj, path):
    commit_with_digest(lambda tmp: torch.save(obj, tmp), path)


STALE_TEMP = re.compile(r".+\.[a-z0-9_]{8}\.tmp")  # atomic_path's <name>.<8 random chars>.tmp


def remove_stale_temps(directory):
    """Delete the temporary files a killed atomic write left in directory -> their names. Only the one
    process that writes there calls it, as it starts (a reader would race a live writer's rename)."""
    if not os.path.isdir(directory):
        return []
    stale = sorted(f for f in os.listdir(directory) if STALE_TEMP.fullmatch(f))
    for name in stale:
        os.remove(os.path.join(directory, name))
    return stale


def report_stale_temps(directory):
    """remove_stale_temps, saying what it removed (one line) when it removed anything."""
    stale = remove_stale_temps(directory)
    if stale:
        print0(f"removed {len(stale)} partial file(s) of an interrupted write in {directory}: {', '.join(stale[:4])}"
               f"{' ...' if len(stale) > 4 else ''}")
    return stale


def load_torch_file(path, device="cpu", what="checkpoint file"):
    """torch.load with weights_only (a pickle that is not plain tensors and containers is refused,
    nothing executed); any failure is one line naming the file."""
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    check_digest(path, what)
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated / foreign file / a pickle of something else
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"cannot read {what} {path}: {type(e).__name__}: {first[:200]}") from None


def check_state_dict(data, path):
    """data must be {name: tensor} with finite floating weights: one line naming the file and tensor."""
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise UserError(f"{path}: expected a state_dict of named tensors, got {type(data).__name__}")
    for name, v in data.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise UserError(f"{path}: {name} holds NaN or inf")
    return data


def json_checksum(obj):
    """sha256 of a JSON object's content, every field but "checksum" itself, keys sorted: the
    checksum a commit record (session.json, a tree's meta.json) carries of itself."""
    body = {k: v for k, v in obj.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def atomic_write_json(obj, path):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)


# -----------------------------------------------------------------------------
# Distributed / device

def get_dist_info():
    """(is_ddp, rank, local_rank, world_size) from the torchrun environment."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    if not all(k in os.environ for k in names):
        return False, 0, 0, 1
    bad = [k for k in names if not os.environ[k].strip().isdigit()]
    if bad:
        raise UserError(f"{bad[0]}={os.environ[bad[0]]!r}: torchrun's RANK, LOCAL_RANK and WORLD_SIZE must be integers >= 0 "
                        "(or all unset for one process)")
    rank, local_rank, world_size = (int(os.environ[k]) for k in names)
    if world_size < 1 or rank >= world_size:
        raise UserError(f"RANK={rank}, WORLD_SIZE={world_size}: torchrun's rank must be below a world size of 1 or more")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise UserError(f"RANK, LOCAL_RANK and WORLD_SIZE are set but {' and '.join(missing)} not: launch with torchrun, "
                        "or unset all three for one process")
    return True, rank, local_rank, world_size


def print0(*args, **kwargs):
    if get_dist_info()[1] == 0:
        print(*args, **kwargs, flush=True)


def autodetect_device_type():
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def usable_cpus():
    """The cores this process may run on: its CPU affinity (taskset, a container's cpuset) where the OS
    reports one, else every core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else max(1, os.cpu_count() or 1)


def synchronize(device):
    """Wait for the work queued on a GPU (CUDA or Apple's MPS run it asynchronously), so a clock read
    after it times the work itself; a no-op on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def keep_freed_memory():
    """glibc hands every freed block over 32 MiB straight back to the kernel, so the next tensor of
    that size (the (B*T, vocab) logits, their softcap and their gradients, every step) page-faults
    all of its memory back in, zeroed. On a CPU that costs more than the op itself (x * 15 over 16M
    floats: ~20 ms instead of ~4 ms on 2 cores). Raise glibc's mmap and trim thresholds so freed
    blocks stay in the heap and are reused. The process keeps its peak heap; no-op off glibc."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def compute_init(device_type=""):
    """Seed, set matmul precision and (under torchrun) init the process group.
    Returns (is_ddp, rank, local_rank, world_size, device)."""
    device_type = device_type or autodetect_device_type()
    if device_type not in ("cuda", "mps", "cpu"):
        raise UserError(f"unknown device type {device_type!r} (expected cuda, mps or cpu)")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device-type cuda was asked for but no CUDA device is available")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device-type mps was asked for but MPS is not available")
    if device_type == "cpu":
        keep_freed_memory()
    torch.manual_seed(42)
    if device_type == "cuda":
        torch.cuda.manual_seed(42)
        torch.set_float32_matmul_precision("high")
    is_ddp, rank, local_rank, world_size = get_dist_info()
    if is_ddp and device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
        dist.barrier()
    elif is_ddp:
        device = torch.device(device_type)
        dist.init_process_group(backend="gloo")
        dist.barrier()
    else:
        device = torch.device(device_type)
    if rank != 0:
        logging.disable(logging.WARNING)
    return is_ddp, rank, local_rank, world_size, device


def all_reduce_mean(tensors, world_size):
    """Average tensors across ranks with one collective per dtype: flatten, all-reduce, copy back."""
    for dtype in dict.fromkeys(t.dtype for t in tensors):  # same order on every rank
        group = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world_size)
        for t, chunk in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(chunk.view_as(t))


def require_at_least_one(parser, args, *names):
    """parser.error for the first of these integer args (dests) below 1."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")


def compute_cleanup():
    """Tear down the process group; scripts call it in a `finally`.
    On a normal exit the ranks first meet at a barrier. Gloo's worker thread drops its last
    reference to a finished collective's tensors after the caller has moved on, and that drop
    needs the GIL; if the process reaches interpreter shutdown first, the thread is killed
    inside a C++ destructor and the rank aborts ("terminate called without an active
    exception", ~1 run in 20 of a 2-rank base_eval). destroy_process_group alone does not
    prevent it: once torch._dynamo is imported (a meta-device model build does it), torch
    keeps the group alive until shutdown. Waiting at the barrier releases the GIL, so the
    worker finishes first. On an exception (sys.exc_info() is set inside `finally`) the
    barrier is skipped: a peer that died would leave it waiting forever."""
    if dist.is_available() and dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# Dtype policy, decided here and nowhere else (a fixed rule, so a run's numerics do not depend on
# which CPU it landed on):
# - CUDA SM80+: activations, embeddings and Muon's Newton-Schulz in bf16; fp32 master weights,
#   logits, positions/rotary and optimizer state.
# - CPU and MPS: everything in fp32. Many CPUs (AVX2-only x86, AVX-512 without BF16/AMX: most
#   laptops and cloud VMs) run a bf16 matmul 35-100x slower than fp32, so no heavy math runs in
#   bf16 there. NANOCHAT_DTYPE=bfloat16 still sets the activation dtype on a CPU (to exercise the
#   GPU's bf16 path in tests), but Newton-Schulz stays fp32 on a CPU whatever the variable says.
# - MegaContext gist trees store fp16 (or bf16) bits on disk and read them back as fp32; the WC
#   is then cast to the model's activation dtype, so storage never sets the compute dtype.

def compute_dtype(device_type):
    """Activation / embedding dtype: bf16 on SM80+ GPUs, fp32 elsewhere; $NANOCHAT_DTYPE
    (bfloat16/float32/float16) overrides."""
    name = os.environ.get("NANOCHAT_DTYPE")
    if name:
        if name not in ("bfloat16", "float32", "float16"):
            raise UserError(f"NANOCHAT_DTYPE={name!r} is not one of bfloat16, float32, float16")
        return getattr(torch, name)
    if device_type == "cuda" and torch.cuda.get_device_capability()[0] >= 8:
        return torch.bfloat16
    return torch.float32


def orthogonalize_dtype(device_type):
    """Dtype of Muon's Newton-Schulz matmuls: bf16 where the GPU computes in bf16, fp32 otherwise
    (always on CPU/MPS; fp16 is never used: its exponent range is too small for the iteration)."""
    if device_type == "cuda" and compute_dtype(device_type) == torch.bfloat16:
        return torch.bfloat16
    return torch.float32
