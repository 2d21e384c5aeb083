"""
MegaContext vs vanilla training throughput on the same preset: raw data tokens per second of an
optimizer step (one micro-batch), vanilla next-token training against `base_train --megacontext`
with the variant budget at w_max (after annealing) and at the annealing midpoint, plus peak GPU
memory of each. Random tokens, no tokenizer or data needed. Prints one JSON line.
It also counts each step's matmul / attention FLOPs (torch's FlopCounterMode, optimizers included):
flop_bound_ratio = vanilla step FLOPs / MegaContext step FLOPs is the tok/s ratio the MegaContext step
would reach at the vanilla step's FLOP/s, so `ratio` below it is overhead, and at it is the work itself.

    python -m benchmarks.mc_train_throughput --config configs/cpu_tiny_mc.toml --steps 3
    python -m benchmarks.mc_train_throughput --config configs/d12_mc.toml          # GPU
Any base_train flag can follow (e.g. --device-batch-size 16, --mc-num-variants 3).
"""

import os
import sys
import json
import time
import statistics
import argparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch.utils.flop_counter import FlopCounterMode

from nanochat.common import UserError, cli_main, compute_dtype, synchronize
from nanochat.megacontext.checkpoint import build_modules
from nanochat.megacontext.config import from_args
from nanochat.megacontext.slate import variant_budget
from nanochat.megacontext.training import MegaContextTrainer
from scripts.base_train import parse_args
from benchmarks.train_throughput import check_run_flags, fresh_model


# FlopCounterMode knows the CUDA attention kernels only: on a CPU, scaled_dot_product_attention runs this op pair
# and would count 0 (for cpu_tiny_mc 58 of the vanilla step's 87 GFLOP). The same count as the CUDA ones: two
# matmuls forward (Q K^T, P V), four backward, over every query head, the causal or window mask not subtracted
# (FlopCounterMode passes shapes: q (B, H, Tq, D), k (B, Hkv, Tk, D)).
_sdpa_flops = lambda q, k: 4 * q[0] * q[1] * q[2] * k[2] * q[3]
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, out_shape=None, **kw: _sdpa_flops(q, k),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *a, out_shape=None, **kw: 2 * _sdpa_flops(q, k),
}
GRID = 10 ** 6  # the annealing schedule's steps: fine enough that its midpoint is a whole step


def main():
    p = argparse.ArgumentParser(allow_abbrev=False, description="The MegaContext training step beside its vanilla twin; "
                                "every other flag is base_train's: a MegaContext preset (--config configs/cpu_tiny_mc.toml) "
                                "or --megacontext with --mc-* flags, and the model's shape")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode (interleaved rounds; the median counts)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=32768)
    own, rest = p.parse_known_args()
    args = parse_args(rest)
    mc = from_args(args)
    if mc is None:
        raise UserError("give a MegaContext preset or --megacontext (the vanilla twin is measured on the same settings)")
    check_run_flags(args, own.steps, own.warmup)
    device_type, device, config, model, optimizers = fresh_model(args, own.vocab_size)
    gistnet, lensnet = build_modules(mc, config, device)
    trainer = MegaContextTrainer(model, gistnet, lensnet, mc)
    optimizers.append(trainer.make_optimizer())
    use_compile = args.compile == 1 or (args.compile == -1 and device_type == "cuda")
    lm = torch.compile(model, dynamic=False) if use_compile else model
    if use_compile:
        trainer.compile()  # the variant forward too, as base_train does
    cuda = device_type == "cuda"
    B, T = args.device_batch_size, args.max_seq_len
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, own.vocab_size, (B, T), device=device, generator=gen)
    y = torch.randint(0, own.vocab_size, (B, T), device=device, generator=gen)

    def measure(step_fns):
        """Median tokens/s (and peak GPU memory) of each step function, timed in interleaved rounds,
        one step of each per round, so a machine that slows down or speeds up mid-run (another
        process, thermal limits) weighs on every mode alike: the ratios stay side by side."""
        for fn in step_fns:
            for _ in range(own.warmup):
                fn()
        times = [[] for _ in step_fns]
        mems = [None] * len(step_fns)
        for _ in range(own.steps):
            for i, fn in enumerate(step_fns):
                synchronize(device)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                fn()
                synchronize(device)
                times[i].append(time.perf_counter() - t0)
                if cuda:
                    mems[i] = max(mems[i] or 0, round(torch.cuda.max_memory_allocated(device) / 2**30, 2))
        return [(round(B * T / statistics.median(t), 1), m) for t, m in zip(times, mems)]

    def count_flops(step_fn):
        with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
            step_fn()
        return counter.get_total_flops()

    def step(anneal_step):
        def fn():
            lm(x, y).backward()
            if anneal_step is not None:
                trainer.backward(x, y, anneal_step, GRID)
            for opt in optimizers:
                opt.step()
            for q in list(model.parameters()) + trainer.parameters():
                q.grad = None
        return fn

    # the annealing step of a GRID-step run: none, halfway through annealing (C2 halfway from the history to w_max;
    # on a 100-step grid cpu_tiny_mc's 0.05 rounded to step 2 of 5: 672 where halfway is 576), C2 = w_max
    modes = dict(vanilla=None, mid=round(GRID * mc.anneal_frac / 2), target=GRID)
    (vanilla, vanilla_mem), (mid, mid_mem), (target, target_mem) = measure([step(s) for s in modes.values()])
    flops = {name: count_flops(step(s)) for name, s in modes.items()}
    result = dict(benchmark="mc_train_throughput", device=torch.cuda.get_device_name(device) if cuda else device_type,
                  cpu_capability=None if cuda else torch.backends.cpu.get_cpu_capability(),  # AVX2 under ATEN_CPU_CAPABILITY=avx2
                  dtype=str(compute_dtype(device_type)).replace("torch.", ""), compiled_lm=use_compile, compiled_mc=use_compile, depth=args.depth,
                  max_seq_len=T, device_batch_size=B, w_max=mc.w_max, horizon=mc.horizon, num_variants=mc.num_variants,
                  vanilla_tok_per_sec=vanilla, mc_tok_per_sec=target, mc_anneal_mid_tok_per_sec=mid,
                  ratio=round(target / vanilla, 3), ratio_anneal_mid=round(mid / vanilla, 3),
                  anneal_mid_budget=variant_budget(modes["mid"], GRID, T - mc.horizon, mc),  # C2 (tokens' worth of slots)
                  vanilla_step_gflop=round(flops["vanilla"] / 1e9, 3), mc_step_gflop=round(flops["target"] / 1e9, 3),
                  mc_anneal_mid_step_gflop=round(flops["mid"] / 1e9, 3),
                  flop_bound_ratio=round(flops["vanilla"] / flops["target"], 3),
                  flop_bound_ratio_anneal_mid=round(flops["vanilla"] / flops["mid"], 3),
                  vanilla_peak_mem_gib=vanilla_mem, mc_peak_mem_gib=target_mem, mc_anneal_mid_peak_mem_gib=mid_mem)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    cli_main(main)
