"""
MegaContext decode cost against history length: per-token latency and process memory of a runtime
Session (nanochat/megacontext/runtime.py) after histories of 1k, 10k, 100k and 1M tokens with a fixed
W_max, the disk tree under a temporary directory; and vanilla decoding with a full KV cache over the
same history, until it no longer fits (the rotary table, or --vanilla-max-gib of cache).
Random weights and tokens: cost does not depend on what the model learned. Prints one JSON line;
progress goes to stderr.

    python -m benchmarks.mc_inference --config configs/cpu_tiny_mc.toml --vocab-size 4096 --device-type cpu
    python -m benchmarks.mc_inference --config configs/d12_mc.toml                                  # GPU
Any base_train flag can follow (e.g. --depth 4 or --mc-recent-tokens 64) and shapes the model; the
runtime's budget is --w-max alone (default 256; a preset's mc_w_max is its training budget, and the
cpu_tiny preset's 128 slots cannot hold the coarsest view of 1M tokens, about 31 slots per level plus
the raw recent tokens).

Per history: mc_ms_per_token is the mean over --decode tokens (a multiple of K: refocuses and plan
slots amortized the same way at every length), mc_p50_ms the median token (no refocus), rss_mb
the process's resident memory after decoding, tree_disk_mb the tree's files. ratio_1m_1k =
mc_ms_per_token(largest history) / mc_ms_per_token(smallest).
"""

import os
import sys
import json
import time
import shutil
import tempfile
import argparse
import statistics

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from nanochat.common import UserError, cli_main, synchronize
from nanochat.engine import KVCache, sample_next
from nanochat.megacontext import BLOCK_SIZE
from nanochat.megacontext.checkpoint import build_modules
from nanochat.megacontext.config import from_args
from nanochat.megacontext.runtime import Session
from scripts.base_train import parse_args
from benchmarks.train_throughput import fresh_model


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def rss_mb():
    """Resident memory of this process now (not the peak), in MiB; None off Linux. compute_init keeps freed
    memory in the heap (keep_freed_memory), so this includes what earlier histories freed: the MegaContext
    histories run first, shortest first, and every vanilla one after them."""
    if not os.path.exists("/proc/self/statm"):
        return None
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


def dir_mb(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)) / 2**20


def random_tokens(n, vocab, seed):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def time_tokens(step, n, device):
    """Run step() n times -> per-call seconds."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def mc_decode(model, gistnet, lensnet, mc, history, vocab, w_max, decode, warmup, workdir, device):
    path = os.path.join(workdir, f"tree_{history}")
    shutil.rmtree(path, ignore_errors=True)  # this benchmark's own scratch tree: what a killed run left
    session = Session.create(model, gistnet, lensnet, mc, path=path, w_max=w_max, seed=0)
    t0 = time.perf_counter()
    ingest = 1 << 20  # fed in pieces: the tree ingests them, the WC restarts from the last
    for a in range(0, history, ingest):
        session.feed(random_tokens(min(ingest, history - a), vocab, a).tolist())
    synchronize(device)
    build_s = time.perf_counter() - t0
    gen = torch.Generator(device=device).manual_seed(1)

    def step():
        token = int(sample_next(session.logits[None], gen, 1.0)[0])
        session.feed([token])

    time_tokens(step, warmup, device)
    slots0 = session.stats["slots_computed"]
    times = time_tokens(step, decode, device)
    focus = session.focus()
    out = dict(history=history, mc_ms_per_token=round(1000 * sum(times) / len(times), 3),
               mc_p50_ms=round(1000 * statistics.median(times), 3), mc_max_ms=round(1000 * max(times), 3),
               slots_per_token=round((session.stats["slots_computed"] - slots0) / decode, 2),
               wc_cost=focus["wc_cost"], tree_levels=focus["tree_levels"], unreachable_tokens=focus["unreachable_tokens"],
               rss_mb=rss_mb(), tree_disk_mb=round(dir_mb(path), 2), build_s=round(build_s, 2))
    session.close()
    shutil.rmtree(path)
    return out


@torch.inference_mode()
def vanilla_decode(model, history, vocab, decode, warmup, max_gib, device):
    """Full-KV-cache decoding after `history` tokens, or (None, reason) when it does not fit."""
    c = model.config
    n = history + warmup + decode
    cache_gib = 2 * c.n_layer * n * c.n_kv_head * (c.n_embd // c.n_head) * model.transformer.wte.weight.element_size() / 2**30
    if n > model.cos.size(1):
        return None, f"history + decode = {n} tokens exceed the rotary table ({model.cos.size(1)})"
    if cache_gib > max_gib:
        return None, f"the KV cache would take {cache_gib:.1f} GiB > --vanilla-max-gib {max_gib}"
    cache = KVCache.for_model(model, 1, n)
    ids = random_tokens(history, vocab, 0).to(device)
    for a in range(0, history, 4096):  # prefill in pieces (bounded attention masks)
        logits = model(ids[None, a:a + 4096], kv_cache=cache)[:, -1]
    gen = torch.Generator(device=device).manual_seed(1)
    state = dict(logits=logits)

    def step():
        token = sample_next(state["logits"], gen, 1.0)
        state["logits"] = model(token[:, None], kv_cache=cache)[:, -1]

    time_tokens(step, warmup, device)
    times = time_tokens(step, decode, device)
    return round(1000 * sum(times) / len(times), 3), None


def main():
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--histories", type=str, default="1000,10000,100000,1000000")
    p.add_argument("--w-max", type=int, default=256, help="the runtime's WC budget, fixed across histories")
    p.add_argument("--decode", type=int, default=128, help="timed tokens per history (a multiple of 32)")
    p.add_argument("--warmup", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--vanilla-max-gib", type=float, default=4.0, help="largest vanilla KV cache to try")
    p.add_argument("--workdir", type=str, default="", help="where the disk trees go (default: a temp dir)")
    own, rest = p.parse_known_args()
    args = parse_args(rest)
    mc = from_args(args)
    if mc is None:
        raise UserError("give a MegaContext preset or --megacontext")
    try:
        histories = sorted(int(h) for h in own.histories.split(","))  # ratio_1m_1k: the longest over the shortest
    except ValueError:
        raise UserError(f"--histories must be comma-separated integers, got {own.histories!r}")
    if len(set(histories)) < len(histories):
        raise UserError(f"--histories lists a length twice: {own.histories!r}")
    if min(histories) < 1 or own.decode < BLOCK_SIZE or own.decode % BLOCK_SIZE or own.warmup < 0:
        raise UserError(f"histories must be >= 1, --decode a positive multiple of {BLOCK_SIZE} and --warmup >= 0")
    if own.workdir and not os.path.isdir(own.workdir):
        raise UserError(f"--workdir {own.workdir}: no such directory")
    torch.set_grad_enabled(False)
    device_type, device, config, model, _ = fresh_model(args, own.vocab_size)
    model.eval()
    gistnet, lensnet = build_modules(mc, config, device)
    workdir = own.workdir or tempfile.mkdtemp(prefix="mc_inference_")
    rows = []
    try:
        for h in histories:
            log(f"history {h:,}: building the tree and decoding {own.decode} tokens ...")
            rows.append(mc_decode(model, gistnet, lensnet, mc, h, own.vocab_size, own.w_max, own.decode, own.warmup, workdir, device))
            log(f"  {json.dumps(rows[-1])}")
        for h, row in zip(histories, rows):  # after every MegaContext row: its full KV cache would stay in their rss_mb
            log(f"history {h:,}: vanilla decoding over a full KV cache ...")
            row["vanilla_ms_per_token"], row["vanilla_note"] = vanilla_decode(model, h, own.vocab_size, own.decode, own.warmup,
                                                                              own.vanilla_max_gib, device)
    finally:
        if not own.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    cuda = device_type == "cuda"
    result = dict(benchmark="mc_inference", device=torch.cuda.get_device_name(device) if cuda else device_type,
                  depth=args.depth, n_embd=config.n_embd, w_max=own.w_max, recent_tokens=mc.recent_tokens, decode_tokens=own.decode,
                  histories=rows, ratio_1m_1k=round(rows[-1]["mc_ms_per_token"] / rows[0]["mc_ms_per_token"], 3))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    cli_main(main)
