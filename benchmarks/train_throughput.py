"""
Training throughput of the base model: tokens/s and MFU for a given depth, sequence length
and device batch, on random tokens (no tokenizer or data needed). Prints one JSON line.
On a CPU it also measures the machine's own matmul rate in the same run (2048^3 products in the training's
dtype, fp32 unless NANOCHAT_DTYPE says otherwise, after each timed step) and prints cpu_mfu = achieved training
FLOP/s / that rate, each the median over the steps.

    python -m benchmarks.train_throughput --depth 12 --max-seq-len 2048 --device-batch-size 32   # GPU: bf16, compiled
    python -m benchmarks.train_throughput --depth 4 --max-seq-len 512 --device-batch-size 8 --vocab-size 4096 --window-pattern L --steps 5 --warmup 1   # CPU
    MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m benchmarks.train_throughput ...   # as an AVX2-only CPU would (MKL_...: Intel)
"""

import os
import sys
import json
import time
import statistics
import argparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from nanochat.common import UserError, cli_main, compute_init, compute_dtype, autodetect_device_type, synchronize
from nanochat.runlog import peak_flops, measured_matmul_flops
from scripts.base_train import model_config_from_args
from nanochat.gpt import GPT, use_flex


def check_run_flags(args, steps, warmup):
    """One-line refusals for the flags the training benchmarks share (a batch of 0 timed 0 tok/s as a result)."""
    if steps < 1 or warmup < 0 or args.device_batch_size < 1 or args.compile not in (-1, 0, 1):
        raise UserError(f"need --steps >= 1, --warmup >= 0, --device-batch-size >= 1 and --compile -1, 0 or 1; got "
                        f"{steps}, {warmup}, {args.device_batch_size}, {args.compile}")


def fresh_model(args, vocab_size):
    """base_train-style args -> (device_type, device, GPTConfig, initialized GPT, its optimizers)."""
    if vocab_size < 2:
        raise UserError(f"--vocab-size must be at least 2, got {vocab_size}")
    device_type = args.device_type or autodetect_device_type()
    _, _, _, _, device = compute_init(device_type)
    config = model_config_from_args(args, vocab_size)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return device_type, device, config, model, model.setup_optimizers()


def main():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], allow_abbrev=False)
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--aspect-ratio", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--window-pattern", type=str, default="SSSL")
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--compile", type=int, default=-1, help="1/0; -1: on cuda only")
    p.add_argument("--device-type", type=str, default="")
    args = p.parse_args()
    check_run_flags(args, args.steps, args.warmup)

    device_type, device, config, model, optimizers = fresh_model(args, args.vocab_size)
    use_compile = args.compile == 1 or (args.compile == -1 and device_type == "cuda")
    step_model = torch.compile(model, dynamic=False) if use_compile else model

    B, T = args.device_batch_size, args.max_seq_len
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, args.vocab_size, (B, T), device=device, generator=gen)
    y = torch.randint(0, args.vocab_size, (B, T), device=device, generator=gen)

    def train_step():
        loss = step_model(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        train_step()
    synchronize(device)
    # each timed step is followed, on a CPU, by a measurement of the matmul peak, so both medians see
    # the same drift (a shared VM's steal time moves either by 30% within a minute)
    step_times, cpu_peaks = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        train_step()
        synchronize(device)
        step_times.append(time.perf_counter() - t0)
        if device_type == "cpu":
            cpu_peaks.append(measured_matmul_flops(device, dtype=compute_dtype(device_type), repeats=2))
    dt = statistics.median(step_times)
    tok_per_sec = B * T / dt
    flops_per_token = model.estimate_flops()
    peak = peak_flops(device)
    cpu_peak = statistics.median(cpu_peaks) if cpu_peaks else None
    result = dict(benchmark="train_throughput", device=torch.cuda.get_device_name(device) if device_type == "cuda" else device_type,
                  dtype=str(compute_dtype(device_type)).replace("torch.", ""), compiled=use_compile, depth=args.depth,
                  n_embd=config.n_embd, max_seq_len=T, window_pattern=config.window_pattern, device_batch_size=B,
                  windowed_attention="flex" if use_flex(device) else "sdpa_mask", step_ms=round(1000 * dt, 2),
                  tok_per_sec=round(tok_per_sec, 1), flops_per_token=flops_per_token,
                  mfu=round(flops_per_token * tok_per_sec / peak, 4) if peak else None,
                  cpu_capability=torch.backends.cpu.get_cpu_capability() if device_type == "cpu" else None,
                  cpu_matmul_gflops=round(cpu_peak / 1e9, 1) if cpu_peak else None,  # in `dtype`
                  cpu_mfu=round(flops_per_token * tok_per_sec / cpu_peak, 4) if cpu_peak else None,
                  peak_mem_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device_type == "cuda" else None)
    print(json.dumps(result))


if __name__ == "__main__":
    cli_main(main)
