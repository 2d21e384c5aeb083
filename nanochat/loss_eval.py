"""
Bits per byte: a tokenizer-independent loss. Sum the nats of every target token, divide by
ln(2) times the UTF-8 bytes those targets stand for. Special tokens (0 bytes) and ignored
targets (-1) count for neither.
"""

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes):
    """batches yields (inputs [B,T], targets [B,T], ...); token_bytes: int32 [vocab] on the model's device."""
    acc_dtype = torch.float32 if token_bytes.device.type == "mps" else torch.float64  # MPS has no float64
    total_nats = torch.zeros((), dtype=acc_dtype, device=token_bytes.device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=token_bytes.device)
    batch_iter = iter(batches)
    for _ in range(steps):
        x, y = next(batch_iter)[:2]
        loss = model(x, y, loss_reduction="none").view(-1)  # (B*T,) nats
        y = y.view(-1)
        valid = y >= 0
        nbytes = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y, dtype=token_bytes.dtype))
        counted = nbytes > 0
        total_nats += (loss.to(acc_dtype) * counted).sum()
        total_bytes += nbytes.sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    total_bytes = total_bytes.item()
    if total_bytes == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * total_bytes)
