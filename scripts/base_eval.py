"""
Evaluate a base model checkpoint: CORE (the DCLM in-context-learning bundle), bits per byte
on the train and val splits, a few greedy samples, and (--eval recall) exact recall of a fact
planted d tokens back in natural text (nanochat/recall.py rows, the val split's filler), by full
attention and by the newest --recall-window tokens alone, for each band of d in --recall-bands.

    python -m scripts.base_eval                                   # largest d<N>, last step, everything
    python -m scripts.base_eval --model-tag d12 --eval core --max-per-task 500
    python -m scripts.base_eval --model-tag cpu_recall --eval recall --recall-bands 100-300,400-600,800-1000
    torchrun --nproc_per_node=8 scripts/base_eval.py              # examples / batches split over ranks

Results go to <base>/base_eval/<model_tag>_<step>.json (written atomically; the evals not run this time keep an
earlier run's figures for the same weights) and a table on stdout.
"""

import os
import sys
import json
import time
import argparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanochat.common import UserError, cli_main, compute_init, compute_cleanup, get_base_dir, print0, atomic_write_json
from nanochat.checkpoint_manager import SOURCE_DIRS, load_model, resolve_checkpoint

EVALS = ("core", "bpb", "sample", "recall")
RESULT_KEYS = ("core", "bpb", "samples", "recall")  # each eval's key in the results
DEFAULT_EVALS = ("core", "bpb", "sample")
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


def build_parser():
    p = argparse.ArgumentParser(description="Evaluate a base model: CORE, bits per byte, samples", allow_abbrev=False)
    p.add_argument("--source", type=str, default="base", choices=sorted(SOURCE_DIRS), help="which checkpoints to load")
    p.add_argument("--model-tag", type=str, default=None, help="checkpoint tag (default: the largest d<N>)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last one)")
    p.add_argument("--eval", type=str, default=",".join(DEFAULT_EVALS), help=f"comma list of {', '.join(EVALS)}")
    p.add_argument("--max-per-task", type=int, default=-1, help="CORE: examples per task (-1: all)")
    p.add_argument("--device-type", type=str, default="", help="cuda|mps|cpu (empty: autodetect)")
    p.add_argument("--split-tokens", type=int, default=20 * 524288, help="bpb: tokens evaluated per split")
    p.add_argument("--device-batch-size", type=int, default=32, help="bpb: rows per forward")
    p.add_argument("--recall-bands", type=str, default="100-300,400-600,800-1000", help="recall: bands of tokens back, lo-hi,...")
    p.add_argument("--recall-docs", type=int, default=64, help="recall: documents per band")
    p.add_argument("--recall-window", type=int, default=128, help="recall: the truncation baseline's window")
    p.add_argument("--bundle-url", type=str, default="", help="CORE bundle zip URL (default: $NANOCHAT_EVAL_BUNDLE_URL or upstream's)")
    return p


def evaluate_bpb_splits(model, tokenizer, device, split_tokens, device_batch_size, world_size):
    from nanochat.tokenizer import get_token_bytes
    from nanochat.dataloader import bos_bestfit_loader
    from nanochat.loss_eval import evaluate_bpb
    token_bytes = get_token_bytes(device=device, tokenizer=tokenizer)
    B, T = device_batch_size, model.config.sequence_len
    steps = max(1, split_tokens // (B * T * world_size))
    bpb = {}
    for split in ("train", "val"):
        t0 = time.time()
        loader = bos_bestfit_loader(tokenizer, B, T, split, device=device)
        bpb[split] = evaluate_bpb(model, loader, steps, token_bytes)
        print0(f"{split} bpb: {bpb[split]:.4f} ({steps} x {B} x {T} tokens per rank, {time.time() - t0:.1f}s)")
    return bpb


def parse_bands(text):
    """"100-300,800-1000" -> [(100, 300), (800, 1000)]; UserError on anything else."""
    bands = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not (sep and lo.isdigit() and hi.isdigit() and 0 < int(lo) <= int(hi)):
            raise UserError(f"--recall-bands takes lo-hi token distances like 100-300,800-1000; got {text!r}")
        bands.append((int(lo), int(hi)))
    return bands


def check_recall_bands(model, bands):
    n = model.config.sequence_len + 1
    if max(hi for _, hi in bands) >= n - 16:
        raise UserError(f"--recall-bands reach past what a row of {n} tokens (the model's sequence_len + 1) can hold")


def evaluate_recall(model, tokenizer, device, bands, num_docs, window):
    """{band "lo-hi": {"full": acc, "truncation": acc}}: exact recall of one fact lo..hi tokens back."""
    from nanochat.recall import recall_eval_docs, recall_accuracy
    check_recall_bands(model, bands)
    n = model.config.sequence_len + 1
    out = {}
    for lo, hi in bands:
        docs = recall_eval_docs(tokenizer, n, num_docs, back=(lo, hi))
        out[f"{lo}-{hi}"] = {"full": recall_accuracy(model, docs, device=device),
                             "truncation": recall_accuracy(model, docs, window, device=device)}
        print0(f"recall {lo}-{hi} tokens back: full {out[f'{lo}-{hi}']['full']:.3f} | newest {window} tokens "
               f"{out[f'{lo}-{hi}']['truncation']:.3f} ({num_docs} documents)")
    return out


def sample_completions(model, tokenizer, max_tokens=16):
    """Greedy completions of the fixed prompts (deterministic, so runs can be compared)."""
    bos = tokenizer.get_bos_token_id()
    samples = []
    for prompt in SAMPLE_PROMPTS:
        tokens = tokenizer.encode(prompt, prepend=bos)
        completion = list(model.generate(tokens, max_tokens=max_tokens, temperature=0))
        samples.append(dict(prompt=prompt, completion=tokenizer.decode(completion)))
    return samples


def with_earlier_results(results, path):
    """results, plus what an earlier run on the same weights wrote to path for the evals not run now: a
    `--eval sample` run no longer wipes the file's (and the report's) bpb and CORE figures. A retrained
    checkpoint at the same tag and step is other weights (its file's size and mtime): nothing is kept."""
    try:
        with open(path, encoding="utf-8") as f:
            earlier = json.load(f)
    except (OSError, ValueError):
        return results
    if not isinstance(earlier, dict) or earlier.get("weights") != results["weights"]:
        return results
    return {**{key: earlier[key] for key in RESULT_KEYS if key in earlier}, **results}


def print_table(results):
    print0("=" * 72)
    print0(f"{results['source']} model {results['model_tag']} step {results['step']}")
    if "bpb" in results:
        for split, value in results["bpb"].items():
            print0(f"  {split + ' bpb':<44} {value:.4f}")
    if "core" in results:
        print0(f"  {'CORE task':<44} {'accuracy':>10} {'centered':>10}")
        for label, acc in results["core"]["results"].items():
            print0(f"  {label:<44} {acc:>10.4f} {results['core']['centered_results'][label]:>10.4f}")
        print0(f"  {'CORE metric':<44} {'':>10} {results['core']['core_metric']:>10.4f}")
    for s in results.get("samples", []):
        print0(f"  {s['prompt']!r} -> {s['completion']!r}")
    print0("=" * 72)


def main(argv=None):
    args = build_parser().parse_args(argv)
    evals = [e.strip() for e in args.eval.split(",") if e.strip()]
    unknown = [e for e in evals if e not in EVALS]
    if unknown or not evals:
        raise UserError(f"--eval takes a comma list of {', '.join(EVALS)}; got {args.eval!r}")
    if args.split_tokens <= 0 or args.device_batch_size <= 0:
        raise UserError("--split-tokens and --device-batch-size must be positive")
    if args.recall_docs < 1 or args.recall_window < 1:
        raise UserError("--recall-docs and --recall-window must be at least 1")
    bands = parse_bands(args.recall_bands) if "recall" in evals else None

    is_ddp, rank, _, world_size, device = compute_init(args.device_type)
    try:
        # resolve the tag and step here so the output file can be named after them
        checkpoint_dir, model_tag, step = resolve_checkpoint(args.source, args.model_tag, args.step)
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=model_tag, step=step)
        # everything that can refuse is checked before the first eval, not after bpb has run for an hour
        if bands is not None:
            check_recall_bands(model, bands)
        if "core" in evals:
            from nanochat.core_eval import evaluate_core, get_eval_bundle, load_bundle_tasks
            core_tasks = load_bundle_tasks(get_eval_bundle(args.bundle_url or None))

        stat = os.stat(os.path.join(checkpoint_dir, f"model_{step:06d}.pt"))
        results = dict(source=args.source, model_tag=model_tag, step=step, world_size=world_size,
                       weights=f"{stat.st_size}:{stat.st_mtime_ns}")  # which file these figures are of
        if "bpb" in evals:
            results["bpb"] = evaluate_bpb_splits(model, tokenizer, device, args.split_tokens, args.device_batch_size, world_size)
        if "recall" in evals:
            results["recall"] = evaluate_recall(model, tokenizer, device, bands, args.recall_docs, args.recall_window)
        if "sample" in evals and rank == 0:  # samples are cheap and identical on every rank
            results["samples"] = sample_completions(model, tokenizer)
        if "core" in evals:
            results["core"] = evaluate_core(model, tokenizer, device, max_per_task=args.max_per_task, tasks=core_tasks)

        if rank == 0:
            name = f"{model_tag}_{step}.json" if args.source == "base" else f"{args.source}_{model_tag}_{step}.json"
            out_path = os.path.join(get_base_dir(), "base_eval", name)
            print_table(results)
            results = with_earlier_results(results, out_path)
            atomic_write_json(results, out_path)
            from nanochat.report import get_report
            summary = {"model_tag": model_tag, "step": step}
            summary.update({f"{split}_bpb": v for split, v in results.get("bpb", {}).items()})
            if "core" in results:
                summary["CORE"] = results["core"]["core_metric"]
            for band, r in results.get("recall", {}).items():
                summary[f"recall {band} back (full / truncation)"] = f"{r['full']:.3f} / {r['truncation']:.3f}"
            samples = ["Samples:\n" + "\n".join(f"- {s!r}" for s in results["samples"])] if "samples" in results else []
            section = "Base model evaluation" + ("" if args.source == "base" else f" {args.source}")  # one per source
            get_report().log(section=section, data=[summary, *samples])
            print0(f"wrote {out_path}")
        return results
    finally:
        compute_cleanup()


if __name__ == "__main__":
    cli_main(main)
