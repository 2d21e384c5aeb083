"""
MegaContext core costs, one JSON line per measurement:
  mc_ingest   tokens/s from token ids through embed + GistNet into the tree (RAM or disk), with
              the tree's size and this process's resident memory (anonymous = heap, file = mapped pages)
  mc_refocus  one refocus at a given W_max over a given history: WC assembly (gather tokens and gists
              into the slot tensors) and one FocusAllocator step, milliseconds (median of --repeats)

    python -m benchmarks.mc_core                                   # 10k..10M tokens, W_max 1k/4k/16k
    python -m benchmarks.mc_core --histories 10000 --w-max 1024 --dim 64 --repeats 2   # smoke test
Histories of --disk-from tokens or more live in a disk tree under --dir (default: a temp dir, deleted).
The GistNet is untrained (costs do not depend on its weights); --gist-kind picks its size.
"""

import os
import sys
import json
import time
import shutil
import argparse
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from nanochat.common import cli_main, usable_cpus
from nanochat.gpt import norm
from nanochat.megacontext import BLOCK_SIZE
from nanochat.megacontext.gistnet import GistNet
from nanochat.megacontext.tree import MegaContextTree
from nanochat.megacontext.working_context import WorkingContext
from nanochat.megacontext.allocator import FocusAllocator


def memory_mb():
    """Resident memory of this process from /proc: (total, anonymous, file-backed), MiB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return None, None, None
    kb = lambda k: int(fields[k].split()[0]) / 1024 if k in fields else None
    return kb("VmRSS"), kb("RssAnon"), kb("RssFile")


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def fill_budget(wc, tree, w_max, recent):
    """Expand the oldest-first coarsest WC, finest detail nearest the present, until the budget is used."""
    i = len(wc) - 1
    while i >= 0:
        e = wc.entries[i]
        if e.level > 0 and wc.cost + BLOCK_SIZE - 1 <= w_max:
            wc = wc.expand(i)
            i = len(wc) - 1 if e.level > 1 else i - 1  # revisit the new children from the newest end
            continue
        i -= 1
    return wc


def main():
    p = argparse.ArgumentParser(description="MegaContext core benchmark", allow_abbrev=False)
    p.add_argument("--histories", type=str, default="10000,100000,1000000,10000000", help="history lengths (tokens)")
    p.add_argument("--w-max", type=str, default="1024,4096,16384", help="working-context budgets")
    p.add_argument("--dim", type=int, default=768, help="embedding dim (768 = d12)")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--gist-kind", type=str, default="mlp", choices=["linear", "mlp", "transformer"])
    p.add_argument("--max-level", type=int, default=3)
    p.add_argument("--recent-tokens", type=int, default=128)
    p.add_argument("--disk-from", type=int, default=1_000_000, help="histories this long or longer use a disk tree")
    p.add_argument("--dir", type=str, default="", help="where disk trees go (default: a temp dir, removed after)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--chunk", type=int, default=65536, help="tokens per ingest call")
    args = p.parse_args()
    try:
        histories = [int(x) for x in args.histories.split(",")]
        budgets = [int(x) for x in args.w_max.split(",")]
    except ValueError:
        p.error(f"--histories and --w-max are comma-separated integers, got {args.histories!r} and {args.w_max!r}")
    if min(histories) < BLOCK_SIZE or min(budgets) < 2 * BLOCK_SIZE or args.repeats < 1:
        p.error(f"histories must be >= {BLOCK_SIZE} tokens, budgets >= {2 * BLOCK_SIZE}, repeats >= 1")
    if args.dim < 2 or args.vocab_size < 2 or args.max_level < 1 or args.recent_tokens < 0 or args.chunk < 1:
        p.error("need --dim >= 2, --vocab-size >= 2, --max-level >= 1, --recent-tokens >= 0 and --chunk >= 1")
    if args.gist_kind == "transformer" and args.dim % 4:
        p.error(f"--gist-kind transformer runs 4 attention heads: --dim must be a multiple of 4, got {args.dim}")
    if args.dir and not os.path.isdir(args.dir):
        p.error(f"--dir {args.dir}: no such directory")

    torch.manual_seed(0)
    if "OMP_NUM_THREADS" not in os.environ:  # the caller's thread setting wins; else the cores this process may use
        torch.set_num_threads(usable_cpus())
    wte = torch.nn.Embedding(args.vocab_size, args.dim)
    embed_tokens = lambda ids: norm(wte(ids))
    gistnet = GistNet(args.dim, kind=args.gist_kind, max_level=args.max_level).eval()
    root = args.dir or tempfile.mkdtemp(prefix="mc_core_")
    try:
        for n in histories:
            disk = n >= args.disk_from
            path = os.path.join(root, f"tree_{n}") if disk else None
            if path:
                shutil.rmtree(path, ignore_errors=True)
            _, anon_before, _ = memory_mb()
            tree = MegaContextTree(args.dim, gistnet, embed_tokens, max_level=args.max_level, path=path)
            g = torch.Generator().manual_seed(n)
            t0 = time.perf_counter()
            with torch.no_grad():
                for s in range(0, n, args.chunk):
                    tree.ingest(torch.randint(0, args.vocab_size, (min(args.chunk, n - s),), generator=g))
                tree.flush()
            dt = time.perf_counter() - t0
            rss, anon, file_mb = memory_mb()
            size = dir_bytes(path) if path else None
            print(json.dumps(dict(benchmark="mc_ingest", history=n, storage="disk" if disk else "ram", dim=args.dim,
                                  gist_kind=args.gist_kind, max_level=args.max_level, seconds=round(dt, 2),
                                  tokens_per_sec=round(n / dt, 1), tree_disk_mb=size and round(size / 2 ** 20, 1),
                                  rss_mb=rss and round(rss, 1), rss_anon_mb=anon and round(anon, 1),
                                  rss_anon_growth_mb=anon and round(anon - anon_before, 1),
                                  rss_file_mb=file_mb and round(file_mb, 1))), flush=True)

            for w_max in budgets:
                wc = WorkingContext.coarsest(tree, recent_tokens=min(args.recent_tokens, w_max - BLOCK_SIZE))
                if wc.cost > w_max:
                    print(json.dumps(dict(benchmark="mc_refocus", history=n, w_max=w_max, skipped=f"the coarsest WC costs {wc.cost}: "
                                          f"deepen --max-level")), flush=True)
                    continue
                wc = fill_budget(wc, tree, w_max, args.recent_tokens)
                filled_cost, filled_entries = wc.cost, len(wc)  # what is reported; allocator steps then move it a little
                allocator = FocusAllocator(w_max, n_diff=4, recent_tokens=min(args.recent_tokens, w_max - BLOCK_SIZE), check=False)
                assemble_ms, alloc_ms = [], []
                gen = torch.Generator().manual_seed(1)
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        slots = wc.assemble(tree, embed_tokens)
                    t1 = time.perf_counter()
                    scores = torch.rand(len(wc), generator=gen) * 2 - 1
                    new_wc, edits = allocator.step(wc, scores, tree)
                    t2 = time.perf_counter()
                    if not assemble_ms:
                        first_slots = int(slots["embeds"].shape[0])  # before the allocator moves the WC
                    assemble_ms.append(1000 * (t1 - t0))
                    alloc_ms.append(1000 * (t2 - t1))
                    wc = new_wc
                med = lambda xs: round(sorted(xs)[len(xs) // 2], 3)
                rss, anon, _ = memory_mb()
                print(json.dumps(dict(benchmark="mc_refocus", history=n, w_max=w_max, storage="disk" if disk else "ram",
                                      wc_cost=filled_cost, wc_entries=filled_entries, slots=first_slots,
                                      assemble_ms=med(assemble_ms), allocator_ms=med(alloc_ms),
                                      rss_anon_mb=anon and round(anon, 1))), flush=True)
            del tree
            if path:
                shutil.rmtree(path, ignore_errors=True)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    cli_main(main)
