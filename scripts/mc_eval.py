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
Results go to <base>/mc_eval/<tag>_step<step>.json (written atomically, --out to change), a
"MegaContext evaluation" report section, and a one-line JSON summary as the last line of stdout.
"""

import os
import sys
import json
import time
import random
import argparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from nanochat.common import UserError, cli_main, compute_init, compute_cleanup, get_base_dir, print0, atomic_path, atomic_write_json
from nanochat.checkpoint_manager import build_model, find_largest_model, find_last_step

LONGRANGE_KINDS = ("passkey", "kv-recall", "variable")
CURVE_KEYS = ("nll_trunc", "nll_mc", "nll_full")


def build_parser():
    p = argparse.ArgumentParser(description="Evaluate a MegaContext checkpoint on the MegaContext path", allow_abbrev=False)
    p.add_argument("--model-tag", type=str, default=None, help="checkpoint tag under base_checkpoints (default: the largest d<N>)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last one)")
    p.add_argument("--device-type", type=str, default="", help="cuda|mps|cpu (empty: autodetect)")
    p.add_argument("--history-mult", type=int, default=8, help="history = this x mc_w_max tokens")
    p.add_argument("--num-docs", type=int, default=32, help="documents per source")
    p.add_argument("--source", type=str, default="both", choices=["val", "longrange", "both"])
    p.add_argument("--refocus-iters", type=int, default=8, help="LensNet + allocator steps per working context")
    p.add_argument("--audit-edits", type=int, default=8, help="single edits measured per working context (0: no audit)")
    p.add_argument("--out", type=str, default="", help="JSON path (default <base>/mc_eval/<tag>_step<step>.json)")
    p.add_argument("--seed", type=int, default=0)
    return p


def val_texts():
    """Every document of the val split, in order."""
    from nanochat.dataset import parquets_iter_batched
    return [t for texts in parquets_iter_batched("val") for t in texts]


def val_documents(tokenizer, texts, num_docs, n_tokens):
    """Up to num_docs token lists of exactly n_tokens: consecutive val documents (BOS + text)
    concatenated, the last one cut; the next list starts with the next document."""
    bos = tokenizer.get_bos_token_id()
    docs, current = [], []
    for i in range(0, len(texts), 64):
        for ids in tokenizer.encode(texts[i:i + 64], prepend=bos):
            current += ids
            if len(current) >= n_tokens:
                docs.append(current[:n_tokens])
                current = []
                if len(docs) == num_docs:
                    return docs
    return docs


def longrange_documents(tokenizer, texts, num_docs, n_tokens, horizon, seed):
    """num_docs (token list of exactly n_tokens, answer tokens): BOS + a long-range document, the
    few tokens it falls short of n_tokens taken from the end of a val text in front of it."""
    from nanochat.longrange import make_document
    bos = tokenizer.get_bos_token_id()
    rng = random.Random(seed)
    count = lambda text: len(tokenizer.encode(text)) + 1  # + the BOS
    out = []
    for j in range(num_docs):
        doc = make_document(LONGRANGE_KINDS[j % len(LONGRANGE_KINDS)], rng, texts, n_tokens, count, depth=rng.uniform(0.0, 0.75))
        ids = tokenizer.encode(doc.text, prepend=bos)[:n_tokens]
        answer = len(ids) - len(tokenizer.encode(doc.prompt, prepend=bos))  # the answer's tokens at the end
        if not 0 < answer <= horizon:
            raise UserError(f"a {doc.kind} document's answer ({answer} tokens) does not fit the horizon of {horizon} tokens")
        pad = []
        while len(pad) < n_tokens - len(ids):  # left padding: the end of some val text
            pad = tokenizer.encode(texts[rng.randrange(len(texts))]) + pad
        out.append((pad[len(pad) - (n_tokens - len(ids)):] + ids, answer))
    return out


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


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("history_mult", "num_docs"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.refocus_iters < 0 or args.audit_edits < 0:
        raise UserError("--refocus-iters and --audit-edits must be >= 0")

    _, rank, _, _, device = compute_init(args.device_type)
    try:
        from nanochat.megacontext.checkpoint import load_megacontext, mc_path
        from nanochat.megacontext.evaluation import measure_sequences, summarize
        t0 = time.time()
        checkpoints_dir = os.path.join(get_base_dir(), "base_checkpoints")
        model_tag = args.model_tag or find_largest_model(checkpoints_dir)
        checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
        step = args.step if args.step is not None else find_last_step(checkpoint_dir)
        if not os.path.exists(mc_path(checkpoint_dir, step)):
            raise UserError(f"{model_tag} step {step} is a vanilla checkpoint (no {os.path.basename(mc_path(checkpoint_dir, step))}): "
                            "mc_eval needs a base_train --megacontext run")
        model, tokenizer, meta = build_model(checkpoint_dir, step, device, "eval")
        mc, gistnet, lensnet, _ = load_megacontext(checkpoint_dir, step, model.config, device)
        gistnet.eval(), lensnet.eval()
        H, history = mc.horizon, args.history_mult * mc.w_max
        print0(f"mc_eval: {model_tag} step {step} | w_max {mc.w_max} | history {history} tokens ({args.history_mult}x) | horizon {H}")

        texts = val_texts()
        docs, answers, source_of = [], [], []
        if args.source in ("val", "both"):
            val = val_documents(tokenizer, texts, args.num_docs, history + H)
            if not val:
                raise UserError(f"the val split has fewer than {history + H} tokens: no document of history + horizon tokens")
            if len(val) < args.num_docs:
                print0(f"warning: the val split holds only {len(val)} documents of {history + H} tokens")
            docs += val
            answers += [0] * len(val)
            source_of += ["val"] * len(val)
        if args.source in ("longrange", "both"):
            for ids, answer in longrange_documents(tokenizer, texts, args.num_docs, history + H, H, args.seed):
                docs.append(ids)
                answers.append(answer)
                source_of.append("longrange")
        sequences = [torch.tensor(d, dtype=torch.long, device=device) for d in docs]
        print0(f"mc_eval: {len(docs)} documents ({', '.join(f'{source_of.count(s)} {s}' for s in dict.fromkeys(source_of))})")

        def grouped(records):
            out = {s: summarize([r for r, src in zip(records, source_of) if src == s]) for s in dict.fromkeys(source_of)}
            out["overall"] = summarize(records)
            return out

        mults = [m for m in (2 ** k for k in range(args.history_mult.bit_length())) if m < args.history_mult] + [args.history_mult]
        curve = []
        for mult in mults:
            t1 = time.time()
            n = mult * mc.w_max + H
            full_run = mult == args.history_mult
            records = measure_sequences(model, gistnet, lensnet, mc, [s[-n:] for s in sequences], H, args.refocus_iters,
                                        args.audit_edits if full_run else 0, answers, seed=args.seed)
            results = grouped(records)
            o = results["overall"]
            gap = "n/a" if o["gap_closed"] is None else f"{o['gap_closed']:.3f}"
            print0(f"history {mult * mc.w_max:6d} tokens: nll trunc {o['nll_trunc']:.4f} | mc {o['nll_mc']:.4f} | "
                   f"full {o['nll_full']:.4f} | gap closed {gap} | swaps/iter {o['swap_rate']:.2f} | {time.time() - t1:.1f}s")
            curve.append(dict(mult=mult, history_tokens=mult * mc.w_max, **{s: {k: r[k] for k in (*CURVE_KEYS, "gap_closed")}
                                                                        for s, r in results.items()}))
        out_path = args.out or os.path.join(get_base_dir(), "mc_eval", f"{model_tag}_step{step}.json")
        png_path = os.path.splitext(out_path)[0] + ".png"
        report = dict(model_tag=model_tag, step=step, mc_config=mc.to_dict(), history_mult=args.history_mult, history_tokens=history,
                      horizon=H, num_docs=args.num_docs, source=args.source, refocus_iters=args.refocus_iters,
                      audit_edits=args.audit_edits, seed=args.seed, results=results, by_history=curve, plot=png_path,
                      seconds=round(time.time() - t0, 1))
        if rank == 0:
            atomic_write_json(report, out_path)
            plot_curves(curve, png_path)
            o = results["overall"]
            summary = dict(model_tag=model_tag, step=step, history_tokens=history, docs=o["n"],
                           **{k: o.get(k) for k in ("nll_trunc", "nll_mc", "nll_full", "gap_closed", "dnll_lod1", "gist_cos_lod1",
                                                     "budget_violations", "wc_util", "audit_sign_agree", "audit_spearman")})
            summary.update({f"{s}_gap_closed": r["gap_closed"] for s, r in results.items() if s != "overall"})
            if "longrange" in results:
                summary["longrange_ans_gap_closed"] = results["longrange"].get("ans_gap_closed")
            from nanochat.report import get_report
            get_report().log(section="MegaContext evaluation", data=[summary])
            print0(f"wrote {out_path} and {png_path}")
            print0(json.dumps(summary))
        return report
    finally:
        compute_cleanup()


if __name__ == "__main__":
    cli_main(main)
