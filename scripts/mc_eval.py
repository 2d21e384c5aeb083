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
import random
import argparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from nanochat.common import UserError, cli_main, compute_init, compute_cleanup, get_base_dir, print0, atomic_path, atomic_write_json
from nanochat.checkpoint_manager import build_model, resolve_checkpoint
from nanochat.megacontext import BLOCK_SIZE as K

LONGRANGE_KINDS = ("passkey", "kv-recall", "variable")
RETRIEVAL_TASKS = ("passkey", "kv-recall", "needle")
CURVE_KEYS = ("nll_trunc", "nll_mc", "nll_full")


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
    p.add_argument("--probe-docs", type=int, default=256, help="--task passkey: facts for the linear probe of their gists' digits (0: none)")
    p.add_argument("--ck-entities", type=int, default=32, help="--task ck: entities in the fact base (3 facts each)")
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


def left_pad(tokenizer, texts, ids, n_tokens, rng):
    """ids with the end of random val texts in front of them, to exactly n_tokens."""
    pad = []
    while len(pad) < n_tokens - len(ids):
        pad = tokenizer.encode(texts[rng.randrange(len(texts))]) + pad
    return pad[len(pad) - (n_tokens - len(ids)):] + ids


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
        out.append((left_pad(tokenizer, texts, ids, n_tokens, rng), answer))  # left padding: the end of some val text
    return out


def retrieval_documents(tokenizer, texts, kind, depth, history, num_docs, rng):
    """num_docs (history ids, answer ids) of kind with the fact at depth: BOS + a long-range document
    cut before its answer, left-padded to exactly `history` tokens with the end of a val text."""
    from nanochat.longrange import make_document
    bos = tokenizer.get_bos_token_id()
    count = lambda text: len(tokenizer.encode(text)) + 1  # + the BOS
    out = []
    for _ in range(num_docs):
        doc = make_document(kind, rng, texts, history, count, depth=depth)
        ids, prompt = tokenizer.encode(doc.text, prepend=bos), tokenizer.encode(doc.prompt, prepend=bos)
        if ids[:len(prompt)] != prompt:
            raise UserError(f"a {kind} document's answer {doc.answer!r} does not tokenize apart from its question")
        out.append((left_pad(tokenizer, texts, prompt, history, rng), ids[len(prompt):]))
    return out


def gist_first_quality(model, gistnet, lensnet, predictor, mc, docs, prompt_tokens):
    """Gist-first vs token-first decoding, scored teacher forced: each document's first prompt_tokens go
    into a fresh runtime Session, the rest is scored token by token (Session.score) once without and
    once with the predicted-gist plans in front of each block. -> dict(nll_token_first, nll_gist_first,
    gist_first_delta = gist - token first (< 0: the plans help), docs, scored_tokens)."""
    from nanochat.megacontext.runtime import Session
    nll = {}
    for gist_first in (False, True):
        scores = []
        for ids in docs:
            session = Session.create(model, gistnet, lensnet, mc, predictor=predictor, gist_first=gist_first)
            session.feed(ids[:prompt_tokens])
            scores.append(session.score(ids[prompt_tokens:]))  # (len(ids) - prompt_tokens,)
        nll[gist_first] = torch.cat(scores).mean().item()
    return dict(nll_token_first=nll[False], nll_gist_first=nll[True], gist_first_delta=nll[True] - nll[False],
                docs=len(docs), scored_tokens=sum(len(ids) - prompt_tokens for ids in docs))


def ask(model, gistnet, lensnet, mc, prompt, answer, memory=None, refocus_iters=8):
    """One question through a fresh runtime Session, the fact memory attached when given: the prompt
    fed, `refocus_iters` LensNet steps, the answer teacher forced. -> (greedy gets all of it, mean NLL, focus)."""
    from nanochat.megacontext.runtime import Session
    session = Session.create(model, gistnet, lensnet, mc)
    if memory is not None:
        session.attach(None, "facts", tree=memory)
    session.feed(prompt)
    session.refocus(refocus_iters)
    nll, hits = session.score(answer, hits=True)
    return bool(hits.all()), nll.mean().item(), session.focus()


def ck_task(args, model, tokenizer, mc, gistnet, lensnet, model_tag, step, rank, t0):
    """--task ck: a synthetic fact base read from a Core-Knowledge memory (nanochat/longrange.py facts,
    one document per entity, the memory built as scripts/mc_build_ck.py builds one). Per asked fact:
      ck / drop / oracle  the question with the memory attached, without it, and (no memory) with the
                          entity's document itself in front of the question: greedy accuracy and answer NLL;
                          CKRI = (L_drop - L_full) / L_full on the answer NLLs (the spec's CK reliance)
      poison              the memory attached and a conflicting statement of the fact in the session:
                          which value greedy decoding gives (session, ck or neither)
      update              the fact's value edited in the memory (tree.rewrite: same token count, gists
                          recomputed, no training step), asked again: the new value given, or still the old."""
    from nanochat.longrange import Fact, fact_base, fact_documents, fact_question, fact_statement, fact_value
    from nanochat.megacontext.composite import ingest_documents
    from nanochat.megacontext.gistnet import AnyLevel
    from nanochat.megacontext.tree import MegaContextTree
    rng = random.Random(args.seed)
    facts = fact_base(rng, args.ck_entities)
    docs = fact_documents(facts)  # {entity: text}
    memory = MegaContextTree(model.config.n_embd, AnyLevel(gistnet), model.embed_tokens)
    with torch.inference_mode():
        spans = dict(zip(docs, ingest_documents(memory, tokenizer, list(docs.values()))))
    asked = rng.sample(facts, min(args.num_docs, len(facts)))
    bos = tokenizer.get_bos_token_id()
    print0(f"mc_eval --task ck: {model_tag} step {step} | w_max {mc.w_max} | {len(facts)} facts of {len(docs)} entities, "
           f"a memory of {memory.num_tokens:,} tokens | {len(asked)} questions")

    def qa(fact, value, before=""):
        """(prompt ids, answer ids): <|bos|> + before + the question; the answer ' ' + value."""
        prompt = tokenizer.encode(before + fact_question(fact), prepend=bos)
        full = tokenizer.encode(before + fact_question(fact) + " " + value, prepend=bos)
        if full[:len(prompt)] != prompt:
            raise UserError(f"the answer {value!r} does not tokenize apart from its question")
        return prompt, full[len(prompt):]

    def other_value(fact, fits=lambda v: True):
        for _ in range(200):
            v = fact_value(fact.attribute, rng)
            if v != fact.value and fits(v):
                return v
        return None

    run = lambda prompt, answer, mem=None: ask(model, gistnet, lensnet, mc, prompt, answer, mem, args.refocus_iters)
    rows = []
    for k, fact in enumerate(asked):
        prompt, answer = qa(fact, fact.value)
        row = dict(entity=fact.entity, attribute=fact.attribute, value=fact.value)
        (row["hit_ck"], row["nll_ck"], focus), (row["hit_drop"], row["nll_drop"], _) = run(prompt, answer, memory), run(prompt, answer)
        row["ck_slots"] = focus["memories"]["facts"]["slots"]
        row["hit_oracle"], row["nll_oracle"], _ = run(*qa(fact, fact.value, docs[fact.entity] + "\n"))
        wrong = other_value(fact)
        before = fact_statement(Fact(fact.entity, fact.attribute, wrong)) + " "
        session_wins = run(*qa(fact, wrong, before), memory)[0]
        ck_wins = run(*qa(fact, fact.value, before), memory)[0]
        row["poison"] = "session" if session_wins else "ck" if ck_wins else "neither"
        rows.append(row)
        print0(f"{k + 1}/{len(asked)} {fact.attribute:5s} ck {row['hit_ck']:d} ({row['nll_ck']:.2f}) | drop {row['hit_drop']:d} "
               f"({row['nll_drop']:.2f}) | oracle {row['hit_oracle']:d} | poison: {row['poison']}")

    # update responsiveness: each asked fact's value edited in the memory, then asked again
    for row, fact in zip(rows, asked):
        start, end = spans[fact.entity]
        new_doc = lambda v: docs[fact.entity].replace(fact_statement(fact), fact_statement(Fact(fact.entity, fact.attribute, v)))
        new = other_value(fact, lambda v: len(tokenizer.encode(new_doc(v), prepend=bos)) == end - start)
        if new is None:
            row["update"] = None  # no other value of the same token count
            continue
        with torch.inference_mode():
            memory.rewrite(start, tokenizer.encode(new_doc(new), prepend=bos))
        docs[fact.entity] = new_doc(new)
        row["update"] = dict(new=new, hit_new=run(*qa(fact, new), memory)[0], hit_old=run(*qa(fact, fact.value), memory)[0])
        fact.value = new

    mean = lambda key: sum(r[key] for r in rows) / len(rows)
    updated = [r["update"] for r in rows if r["update"] is not None]
    summary = dict(model_tag=model_tag, step=step, task="ck", questions=len(rows), memory_tokens=memory.num_tokens,
                   acc_ck=mean("hit_ck"), acc_drop=mean("hit_drop"), acc_oracle=mean("hit_oracle"),
                   nll_full=mean("nll_ck"), nll_drop=mean("nll_drop"), nll_oracle=mean("nll_oracle"),
                   ckri=(mean("nll_drop") - mean("nll_ck")) / mean("nll_ck"), ck_slots=mean("ck_slots"),
                   poison_session_wins=sum(r["poison"] == "session" for r in rows) / len(rows),
                   poison_ck_wins=sum(r["poison"] == "ck" for r in rows) / len(rows),
                   updated=len(updated), update_followed=sum(u["hit_new"] for u in updated) / max(1, len(updated)),
                   update_old_kept=sum(u["hit_old"] for u in updated) / max(1, len(updated)))
    out_path = args.out or os.path.join(get_base_dir(), "mc_eval", f"{model_tag}_step{step}_ck.json")
    report = dict(summary, entities=args.ck_entities, refocus_iters=args.refocus_iters, seed=args.seed, w_max=mc.w_max,
                  mc_config=mc.to_dict(), rows=rows, seconds=round(time.time() - t0, 1))
    if rank == 0:
        atomic_write_json(report, out_path)
        print0(f"wrote {out_path}")
        print0(json.dumps(summary))
    return report


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
    from nanochat.megacontext.evaluation import METHODS
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


def recall_verdict(task_results, task, mult):
    """The one-line verdict at one history multiple, each method's accuracy averaged over the depths."""
    acc = {m: cell_mean([task_results[m][str(mult)]], "acc") for m in ("megacontext", "truncation", "full")}
    pct = {m: "n/a" if a is None else f"{100 * a:.0f}%" for m, a in acc.items()}
    return (f"MegaContext recalls {pct['megacontext']} at {mult}x W_max on {task} "
            f"(truncation {pct['truncation']}, full {pct['full']})")


def cell_mean(tables, key):
    """The mean of key (acc or nll) over every cell of depth tables ({depth: cell}, None skipped), or None."""
    cells = [c for table in tables if table for c in table.values()]
    return sum(c[key] for c in cells) / len(cells) if cells else None


def retrieval(args, model, tokenizer, mc, gistnet, lensnet, model_tag, step, rank, device, t0):
    """The --task run: retrieval accuracy per task, method, history multiple and depth (see the top)."""
    from nanochat.longrange import num_answers
    from nanochat.megacontext.evaluation import METHODS, measure_retrieval, receptive_field, retrieval_summary
    tasks = RETRIEVAL_TASKS if args.task == "retrieval" else (args.task,)
    mults, depths = args.mults, args.depths
    table, field = model.cos.size(1), receptive_field(model)
    print0(f"mc_eval --task {args.task}: {model_tag} step {step} | w_max {mc.w_max} | mults {mults} | depths {depths} | "
           f"{args.num_docs} documents per cell | full attention reads up to {field} tokens, rotary table {table}")
    texts = val_texts()
    results = {task: {method: {} for method in METHODS} for task in tasks}
    full_skipped, mc_levels = {}, {}
    for task in tasks:
        for mult in mults:
            t1 = time.time()
            history = mult * mc.w_max
            histories, answers, depth_of = [], [], []
            for depth in depths:
                rng = random.Random(f"{args.seed}/{task}/{mult}/{depth:g}")  # each cell's documents, whatever else runs
                for ids, answer in retrieval_documents(tokenizer, texts, task, depth, history, args.num_docs, rng):
                    histories.append(torch.tensor(ids, dtype=torch.long, device=device))
                    answers.append(torch.tensor(answer, dtype=torch.long, device=device))
                    depth_of.append(depth)
            records, levels = measure_retrieval(model, gistnet, lensnet, mc, histories, answers, args.refocus_iters, seed=args.seed)
            mc_levels[str(mult)] = max(levels)
            for method in METHODS:
                cells = {f"{d:g}": retrieval_summary([r for r, dd in zip(records[method], depth_of) if dd == d]) for d in depths}
                results[task][method][str(mult)] = None if None in cells.values() else cells
            if results[task]["full"][str(mult)] is None:
                longest = max(a.numel() for a in answers)
                full_skipped.setdefault(task, {})[str(mult)] = (f"history {history} + answer up to {longest} tokens exceed "
                                                                f"the model's rotary table of {table} positions")
            line = []
            for method in METHODS:
                table = results[task][method][str(mult)]
                line.append(f"{method} n/a" if table is None else
                            f"{method} acc {cell_mean([table], 'acc'):.3f} nll {cell_mean([table], 'nll'):.3f}"
                            + (f" fact raw {cell_mean([table], 'fact_raw_start'):.2f} -> {cell_mean([table], 'fact_raw'):.2f}"
                               f" ({cell_mean([table], 'swaps'):.1f} swaps)" if method == "megacontext"
                               and all("fact_raw" in c and "fact_raw_start" in c for c in table.values()) else ""))
            print0(f"{task:9s} {mult:3d}x ({history:6d} tokens, LOD{mc_levels[str(mult)]}): " + " | ".join(line) +
                   f" | {time.time() - t1:.1f}s")

    probes = None
    if "passkey" in tasks and args.probe_docs >= 4:  # does the fact block's gist carry the digits? (probes.digit_probe)
        from nanochat.recall import recall_eval_docs
        from nanochat.megacontext.evaluation import gist_digit_probe
        docs = recall_eval_docs(tokenizer, 4 * mc.w_max, args.probe_docs, seed=args.seed)
        probes = gist_digit_probe(model, gistnet, [torch.tensor(h, device=device) for h, _ in docs],
                                  [torch.tensor(a, device=device) for _, a in docs],
                                  [tokenizer.decode(a).strip(" .") for _, a in docs])
        if probes["gist"] is not None:
            print0(f"digit probe ({probes['n']} facts, chance 0.10 per digit): from the fact block's gist "
                   + " ".join(f"{v:.2f}" for v in probes["gist"]) + " | from its mean token embedding "
                   + " ".join(f"{v:.2f}" for v in probes["mean"]))
    verdicts = [recall_verdict(results[task], task, m) for task in tasks for m in mults if m in (8, 16)]
    out_path = args.out or os.path.join(get_base_dir(), "mc_eval", f"{model_tag}_step{step}_{args.task}.json")
    png_path = os.path.splitext(out_path)[0] + ".png"
    report = dict(model_tag=model_tag, step=step, task=args.task, tasks=list(tasks), methods=list(METHODS), mults=mults,
                  depths=depths, num_docs=args.num_docs, w_max=mc.w_max, history_tokens={str(m): m * mc.w_max for m in mults},
                  refocus_iters=args.refocus_iters, seed=args.seed, mc_config=mc.to_dict(), mc_levels=mc_levels,
                  sequence_len=model.config.sequence_len, rotary_table=table, full_receptive_field=field,
                  chance={task: 1 / num_answers(task) for task in tasks}, results=results, full_skipped=full_skipped, probes=probes,
                  verdicts=verdicts,
                  plot=png_path, seconds=round(time.time() - t0, 1))
    if rank == 0:
        atomic_write_json(report, out_path)
        plot_retrieval(results, tasks, mults, depths, png_path)
        mult = 16 if 16 in mults else mults[len(mults) // 2]  # the summary's history length
        summary = dict(model_tag=model_tag, step=step, task=args.task, mult=mult, history_tokens=mult * mc.w_max,
                       docs_per_cell=args.num_docs)
        for key in ("acc", "nll"):
            for method in METHODS:
                summary[f"{key}_{method}"] = cell_mean([results[task][method][str(mult)] for task in tasks], key)
        summary["acc_chance"] = sum(report["chance"].values()) / len(tasks)
        print0(f"wrote {out_path} and {png_path}")
        for line in verdicts:
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

    _, rank, _, _, device = compute_init(args.device_type)
    try:
        from nanochat.megacontext.checkpoint import load_megacontext, load_predictor, mc_path
        from nanochat.megacontext.evaluation import measure_sequences, summarize
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
        # MegaPrediction: does decoding with the predicted gist of each block as a plan read the text better?
        gist_first = None
        predictor = load_predictor(checkpoint_dir, step, model.config, device)
        if predictor is not None and args.gist_first_docs > 0 and mc.w_max < mc.recent_tokens + 2 * K:
            print0(f"gist-first decoding: skipped, the runtime needs w_max >= recent_tokens + {2 * K} (w_max is {mc.w_max})")
        elif predictor is not None and args.gist_first_docs > 0:
            t1 = time.time()
            docs = val_documents(tokenizer, texts, args.gist_first_docs, history + 4 * K)  # history fed, 4 blocks scored
            gist_first = gist_first_quality(model, gistnet, lensnet, predictor.eval(), mc, docs, history)
            print0(f"gist-first decoding: nll {gist_first['nll_gist_first']:.4f} vs token-first {gist_first['nll_token_first']:.4f} "
                   f"(delta {gist_first['gist_first_delta']:+.4f}) over {gist_first['scored_tokens']} tokens | {time.time() - t1:.1f}s")
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
                                                     "budget_violations", "wc_util", "audit_sign_agree", "audit_spearman")})
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
