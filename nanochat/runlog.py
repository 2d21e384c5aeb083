"""
Run metrics: always appended to a local JSONL file (one object per line), and mirrored to
wandb when a run name other than "dummy" is given. Also the peak FLOP/s that MFU divides by: a
GPU's listed bf16 peak, or a CPU's own fp32 matmul rate measured in the run.
"""

import os
import re
import json
import math
import time

import torch

from nanochat.common import atomic_path, synchronize


def strict_json(v):
    """NaN and +-inf -> None, in lists and dicts too: a diverging run's record stays JSON every reader parses."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: strict_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [strict_json(x) for x in v]
    return v


class RunLog:
    def __init__(self, path, run="dummy", user_config=None, enabled=True, project="nanochat", resume_step=None, fresh=False):
        """resume_step: a run resumed from that step's checkpoint keeps what led up to it (train and CORE records
        through it, evaluations before it: base_train evaluates its start step again, CORE only past it) and
        drops what a run that went past it wrote, so the log reads as one run. fresh: a new run's log replaces
        the one there (a replaced run's, or that of a run stopped before its first save), made last thing before
        training, so a run refused during its set-up leaves the earlier log with the earlier checkpoints."""
        self.path, self.enabled, self.wandb = path, enabled, None
        if not enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if fresh and os.path.exists(path):
            os.remove(path)
        elif resume_step is not None and os.path.exists(path):
            self._truncate(resume_step)
        elif os.path.exists(path):
            self._end_line()
        if run != "dummy":
            import wandb
            self.wandb = wandb.init(project=project, name=run, config=user_config)

    def _end_line(self):
        """A log a crash cut mid-line: end that line, so the next record starts on its own (readers skip
        the torn one) instead of being glued to it and lost too."""
        with open(self.path, "rb+") as f:
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def _truncate(self, step):
        with open(self.path, encoding="utf-8", errors="replace") as f:  # torn bytes: that line fails to parse below
            lines = f.read().splitlines()
        kept = []
        for line in lines:
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            at = r.get("step") if isinstance(r, dict) else None
            if isinstance(at, int) and (at < step or (at == step and r.get("kind") in ("train", "core"))):
                kept.append(line)
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in kept)

    def write(self, **metrics):
        if not self.enabled:
            return
        metrics = {k: strict_json(v) for k, v in metrics.items()}
        record = {"time": time.time(), **metrics}
        with open(self.path, "a", encoding="utf-8") as f:  # one short line per append: a crash loses at most that line
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}, step=metrics.get("step"))

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()


# dense bf16 tensor-core peak, FLOP/s, by a whole word of the device name; a variant before its family
# ("NVIDIA H100 PCIe" before "NVIDIA H100 80GB HBM3", the SXM part), and "L4" does not match "NVIDIA L40"
PEAK_BF16_FLOPS = [("GH200", 989e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("B200", 2250e12),
                   ("A100", 312e12), ("A10G", 125e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
                   ("RTX 4090", 165e12), ("RTX 3090", 71e12)]


def peak_flops(device):
    """Peak bf16 FLOP/s of a CUDA device, or None where unknown (CPU, MPS, unlisted GPUs)."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if re.search(rf"\b{re.escape(key)}\b", name):
            return flops
    return None


def measured_matmul_flops(device, dtype=torch.float32, n=2048, repeats=5):
    """This machine's achievable matmul FLOP/s: the best of `repeats` (n, n) @ (n, n) products in
    `dtype`, after one untimed. On a CPU this is the MFU denominator (cpu_mfu): there is no
    listed peak, it varies with the ISA (AVX2 vs AVX-512), the cores and the BLAS, and the same
    run's measurement keeps the ratio honest on a noisy machine. ~0.1 s a product on 2 cores."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    device = torch.device(device)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best
