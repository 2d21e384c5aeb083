"""
Run metrics: always appended to a local JSONL file (one object per line), and mirrored to
wandb when a run name other than "dummy" is given. Also the peak bf16 FLOP/s used for MFU.
"""

import os
import json
import time

import torch


class RunLog:
    def __init__(self, path, run="dummy", user_config=None, enabled=True, project="nanochat"):
        self.path, self.enabled, self.wandb = path, enabled, None
        if not enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if run != "dummy":
            import wandb
            self.wandb = wandb.init(project=project, name=run, config=user_config)

    def write(self, **metrics):
        if not self.enabled:
            return
        metrics = {k: None if isinstance(v, float) and v != v else v for k, v in metrics.items()}  # NaN -> null (strict JSON)
        record = {"time": time.time(), **metrics}
        with open(self.path, "a", encoding="utf-8") as f:  # one short line per append: a crash loses at most that line
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}, step=metrics.get("step"))

    def finish(self):
        if self.wandb is not None:
            self.wandb.finish()


# dense bf16 tensor-core peak, FLOP/s, by device name
PEAK_BF16_FLOPS = [("H200", 989e12), ("H100", 989e12), ("B200", 2250e12), ("A100", 312e12), ("A10G", 125e12),
                   ("L40S", 362e12), ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12)]


def peak_flops(device):
    """Peak bf16 FLOP/s of a CUDA device, or None where unknown (CPU, MPS, unlisted GPUs)."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None
