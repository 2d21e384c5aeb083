"""
Evaluate a MegaContext checkpoint (base_train --megacontext) on the MegaContext path: how much of
the gap between a truncated window of w_max tokens and the whole history a working context of
w_max slots closes, GistNet's substitutability, LensNet audits and the budget invariants
(nanochat/megacontext/evaluation.py says what each number measures).

    python -m scripts.mc_eval --model-tag d12_mc
    python -m scripts.mc_eval --model-tag cpu_tiny_mc --num-docs 8 --source longrange --device-type cpu

Documents, each history + H tokens (history = --history-mult x w_max, H = the run's mc_horizon):
  val        held-out text: consecutive documents of the val split, each with its BOS, concatenated
             and cut to exactly history + H tokens (then the next document starts the next one)
  longrange  synthetic recall documents (nanochat/longrange.py: passkey, kv-recall, variable in
             turn) with val texts as filler, the fact in the first 3/4 of the document and its
             answer at the very end, so the horizon ends with it (ans_* metrics: its tokens alone)
Reported per source and overall, plus NLL against history length: the same documents cut to their
last mult x w_max history tokens for mult = 1, 2, 4, 8, ... up to --history-mult (a PNG of the
truncated / MC / full curves next to the JSON).
With MegaPrediction readouts in the checkpoint (base_train --megaprediction), also gist-first vs
token-first decoding: --gist-first-docs val documents, the history fed to a runtime Session and the
next 4 blocks scored teacher forced with and without the predicted gist of each block as a plan
(gist_first_delta = NLL gist-first - token-first; < 0: the plans help).
Results go to <base>/mc_eval/<tag>_step<step>.json (written atomically, --out to change), a
"MegaContext evaluation" report section, and a one-line JSON summary as the last line of stdout.

Retrieval (--task passkey | kv-recall | needle, or retrieval for all three):

    python -m scripts.mc_eval --model-tag cpu_tiny_mc --task retrieval --num-docs 8 --device-type cpu
    python -m scripts.mc_eval --task needle --depths 0.1,0.5,0.9 --mults 4,16,64

For each history multiple m (history = m x w_max tokens, --mults) and depth d (where the fact sits,
as a fraction of the history, --depths), --num-docs documents of the kind (default 8) whose answer
comes right after the history. A document is retrieved when greedy argmax predicts all of its answer
tokens (teacher forced) from: the MegaContext working context, the newest w_max tokens (truncation),
or the whole history (full, null where history + answer exceed the model's rotary table); the retrieval
section of nanochat/megacontext/evaluation.py says how each reads the history. Results go to
<base>/mc_eval/<tag>_step<step>_<task>.json (nll: the mean answer NLL per token; chance: 1 / the answers
a document of the kind can have):
    {"results": {task: {method: {mult: {depth: {"acc", "nll", "n"}} or null}}}, "chance": {task: p},
     "full_skipped": {task: {mult: reason}}, "mc_levels": {mult: gist level}, ...}
and a heat map of the accuracies beside it (.png); the one-line summary gives each method's accuracy
and answer NLL at 16x (or the middle multiple) averaged over tasks and depths. --history-mult, --source,
--audit-edits and --gist-first-docs are unused; no report section is written.
"""

import os
import sys
import json
import time
import argparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanochat.common import UserError, cli_main, compute_init, compute_cleanup, get_base_dir, print0, atomic_path, atomic_write_json
from nanochat.checkpoint_manager import build_model, resolve_checkpoint
from nanochat.megacontext.evaluation import CURVE_KEYS, run_history
from nanochat.megacontext.retrieval import RETRIEVAL_TASKS, retrieval_summary_line, run_ck, run_retrieval



def build_parser():
    p = argparse.ArgumentParser(description="Evaluate a MegaContext checkpoint on the MegaContext path", allow_abbrev=False)
    p.add_argument("--model-tag", type=str, default=None, help="checkpoint tag under base_checkpoints (default: the largest d<N>)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last one)")
    p.add_argument("--device-type", type=str, default="", help="cuda|mps|cpu (empty: autodetect)")
    p.add_argument("--history-mult", type=int, default=8, help="history = this x mc_w_max tokens")
    p.add_argument("--num-docs", type=int, default=None, help="documents per source (default 32); with --task, per cell (default 8)")
    p.add_argument("--source", type=str, default="both", choices=["val", "longrange", "both"])
    p.add_argument("--refocus-iters", type=int, default=8, help="LensNet + allocator steps per working context")
    p.add_argument("--audit-edits", type=int, default=8, help="single edits measured per working context (0: no audit)")
    p.add_argument("--out", type=str, default="", help="JSON path (default <base>/mc_eval/<tag>_step<step>.json; "
                   "with --task <tag>_step<step>_<task>.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gist-first-docs", type=int, default=8, help="val documents for gist-first vs token-first decoding "
                   "(checkpoints with MegaPrediction readouts; 0: skip)")
    p.add_argument("--task", type=str, default="", help="passkey | kv-recall | needle | retrieval (all three): retrieval accuracy "
                   "instead of the default evaluation; ck: facts read from a Core-Knowledge memory")
    p.add_argument("--depths", type=str, default="0.1,0.3,0.5,0.7,0.9", help="--task: where the fact sits, fractions of the history")
    p.add_argument("--mults", type=str, default="4,8,16,32,64", help="--task: history lengths, multiples of mc_w_max")
    p.add_argument("--probe-docs", type=int, default=256, help="--task passkey: facts for the linear probe of their gists' digits (0: none, else at least 4)")
    p.add_argument("--ck-entities", type=int, default=32, help="--task ck: entities in the fact base (3 facts each)")
    return p


def parse_list(text, kind, flag):
    """'0.1,0.5' -> [0.1, 0.5] (kind float or int), or a one-line UserError naming the flag."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} must be a comma-separated list of {kind.__name__}s, got {text!r}") from None
    if not values:
        raise UserError(f"{flag} is empty")
    return values


def plot_curves(curve, path):
    """The curve's three NLLs against history length -> PNG at path (atomically)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [point["history_tokens"] for point in curve]
    labels = dict(nll_trunc="truncated (newest w_max tokens)", nll_mc="MegaContext (w_max slots)", nll_full="full history")
    for key in CURVE_KEYS:
        ax.plot(x, [point["overall"][key] for point in curve], marker="o", label=labels[key])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("history tokens")
    ax.set_ylabel("horizon NLL (nats / token)")
    ax.set_title("MegaContext: horizon NLL vs history length")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_retrieval(results, tasks, mults, depths, path):
    """Heat maps of retrieval accuracy -> PNG at path (atomically): a row of panels per task, one
    panel per method, history multiple (rows) x depth (columns), the accuracy written in each cell."""
    import numpy as np
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nanochat.megacontext.retrieval import METHODS
    fig, axes = plt.subplots(len(tasks), len(METHODS), figsize=(3.4 * len(METHODS) + 1, 0.4 * len(mults) * len(tasks) + 1.2 * len(tasks)),
                             squeeze=False, layout="constrained")
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")  # grey: not run
    for r, task in enumerate(tasks):
        for c, method in enumerate(METHODS):
            ax, table = axes[r][c], results[task][method]
            acc = np.array([[np.nan if table[str(m)] is None else table[str(m)][f"{d:g}"]["acc"] for d in depths] for m in mults])
            image = ax.imshow(acc, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
            for i in range(len(mults)):
                for j in range(len(depths)):
                    v = acc[i, j]
                    ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8,
                            color="black" if np.isnan(v) or v > 0.5 else "white")
            ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
            ax.set_yticks(range(len(mults)), [f"{m}x" for m in mults])
            ax.set_title(f"{task}: {method}", fontsize=10)
            if r == len(tasks) - 1:
                ax.set_xlabel("depth of the fact in the history")
            if c == 0:
                ax.set_ylabel("history (x w_max)")
    fig.colorbar(image, ax=axes, label="retrieval accuracy", shrink=0.8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def ck_task(args, model, tokenizer, mc, gistnet, lensnet, model_tag, step, rank, t0):
    """--task ck: retrieval.run_ck, written to <tag>_step<step>_ck.json."""
    print0(f"mc_eval: {model_tag} step {step}")
    summary, report = run_ck(model, tokenizer, mc, gistnet, lensnet, args.ck_entities, args.num_docs, args.refocus_iters, args.seed)
    summary = dict(model_tag=model_tag, step=step, task="ck", **summary)
    report = dict(report, model_tag=model_tag, step=step, task="ck", seconds=round(time.time() - t0, 1))
    out_path = args.out or os.path.join(get_base_dir(), "mc_eval", f"{model_tag}_step{step}_ck.json")
    if rank == 0:
        atomic_write_json(report, out_path)
        print0(f"wrote {out_path}")
        print0(json.dumps(summary))
    return report


def retrieval(args, model, tokenizer, mc, gistnet, lensnet, model_tag, step, rank, device, t0):
    """The --task run: retrieval.run_retrieval, written to <tag>_step<step>_<task>.json + its heat map."""
    print0(f"mc_eval: {model_tag} step {step}")
    tasks = RETRIEVAL_TASKS if args.task == "retrieval" else (args.task,)
    out_path = args.out or os.path.join(get_base_dir(), "mc_eval", f"{model_tag}_step{step}_{args.task}.json")
    png_path = os.path.splitext(out_path)[0] + ".png"
    report = run_retrieval(model, tokenizer, mc, gistnet, lensnet, tasks, args.mults, args.depths, args.num_docs,
                           args.refocus_iters, args.seed, args.probe_docs, device)
    report = dict(model_tag=model_tag, step=step, task=args.task, **report, plot=png_path, seconds=round(time.time() - t0, 1))
    if rank == 0:
        atomic_write_json(report, out_path)
        plot_retrieval(report["results"], tasks, args.mults, args.depths, png_path)
        mult = 16 if 16 in args.mults else args.mults[len(args.mults) // 2]  # the summary's history length
        summary = dict(model_tag=model_tag, step=step, task=args.task, mult=mult, history_tokens=mult * mc.w_max,
                       docs_per_cell=args.num_docs, **retrieval_summary_line(report, mult))
        print0(f"wrote {out_path} and {png_path}")
        for line in report["verdicts"]:
            print0(line)
        print0(json.dumps(summary))
    return report


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_docs is None:
        args.num_docs = 8 if args.task else 32
    if args.task:
        if args.task not in RETRIEVAL_TASKS + ("retrieval", "ck"):
            raise UserError(f"unknown --task {args.task!r}; expected one of {', '.join(RETRIEVAL_TASKS + ('retrieval', 'ck'))}")
        if args.ck_entities < 1:
            raise UserError("--ck-entities must be at least 1")
        args.depths = list(dict.fromkeys(parse_list(args.depths, float, "--depths")))  # in order, once each
        args.mults = list(dict.fromkeys(parse_list(args.mults, int, "--mults")))
        if not all(0.0 < d < 1.0 for d in args.depths):
            raise UserError(f"--depths must lie strictly between 0 and 1, got {args.depths}")
        if min(args.mults) < 1:
            raise UserError(f"--mults must be at least 1, got {args.mults}")
    if args.gist_first_docs < 0:
        raise UserError("--gist-first-docs must be >= 0")
    for name in ("history_mult", "num_docs"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.refocus_iters < 0 or args.audit_edits < 0:
        raise UserError("--refocus-iters and --audit-edits must be >= 0")
    if args.out and os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a directory: give the JSON file's path")
    if args.out.lower().endswith(".png"):  # the plot goes to the same name with .png: it overwrote the results
        raise UserError(f"--out {args.out} names the plot's file: give the JSON file's path (the plot goes beside it as .png)")
    if 0 < args.probe_docs < 4:
        raise UserError(f"--probe-docs must be 0 (none) or at least 4 (it fits on half and scores on the other half), got {args.probe_docs}")

    _, rank, _, _, device = compute_init(args.device_type)
    try:
        from nanochat.megacontext.checkpoint import load_megacontext, load_predictor, mc_path
        t0 = time.time()
        checkpoint_dir, model_tag, step = resolve_checkpoint("base", args.model_tag, args.step)
        if not os.path.exists(mc_path(checkpoint_dir, step)):
            raise UserError(f"{model_tag} step {step} is a vanilla checkpoint (no {os.path.basename(mc_path(checkpoint_dir, step))}): "
                            "mc_eval needs a base_train --megacontext run")
        model, tokenizer, meta = build_model(checkpoint_dir, step, device, "eval")
        mc, gistnet, lensnet, _ = load_megacontext(checkpoint_dir, step, model.config, device)
        gistnet.eval(), lensnet.eval()
        if args.task == "ck":
            return ck_task(args, model, tokenizer, mc, gistnet, lensnet, model_tag, step, rank, t0)
        if args.task:
            return retrieval(args, model, tokenizer, mc, gistnet, lensnet, model_tag, step, rank, device, t0)
        H, history = mc.horizon, args.history_mult * mc.w_max
        print0(f"mc_eval: {model_tag} step {step}")
        predictor = load_predictor(checkpoint_dir, step, model.config, device)
        results, curve, gist_first = run_history(model, tokenizer, mc, gistnet, lensnet, predictor, args.history_mult, args.num_docs,
                                                 args.source, args.refocus_iters, args.audit_edits, args.seed, args.gist_first_docs, device)
        out_path = args.out or os.path.join(get_base_dir(), "mc_eval", f"{model_tag}_step{step}.json")
        png_path = os.path.splitext(out_path)[0] + ".png"
        report = dict(model_tag=model_tag, step=step, mc_config=mc.to_dict(), history_mult=args.history_mult, history_tokens=history,
                      horizon=H, num_docs=args.num_docs, source=args.source, refocus_iters=args.refocus_iters,
                      audit_edits=args.audit_edits, seed=args.seed, results=results, by_history=curve, gist_first=gist_first,
                      plot=png_path, seconds=round(time.time() - t0, 1))
        if rank == 0:
            atomic_write_json(report, out_path)
            plot_curves(curve, png_path)
            o = results["overall"]
            summary = dict(model_tag=model_tag, step=step, history_tokens=history, docs=o["n"],
                           **{k: o.get(k) for k in ("nll_trunc", "nll_mc", "nll_full", "gap_closed", "dnll_lod1", "gist_cos_lod1",
                                                     "budget_violations", "wc_util", "audit_sign_agree", "audit_sign_base",
                                                     "audit_spearman", "audit_spearman_within")})
            summary.update({f"{s}_gap_closed": r["gap_closed"] for s, r in results.items() if s != "overall"})
            if "longrange" in results:
                summary["longrange_ans_gap_closed"] = results["longrange"].get("ans_gap_closed")
            if gist_first is not None:
                summary["gist_first_delta"] = gist_first["gist_first_delta"]
            from nanochat.report import get_report
            get_report().log(section="MegaContext evaluation", data=[summary])
            print0(f"wrote {out_path} and {png_path}")
            print0(json.dumps(summary))
        return report
    finally:
        compute_cleanup()


if __name__ == "__main__":
    cli_main(main)
