"""
Retrieval (scripts/mc_eval.py --task): is a fact from far back recalled exactly? And the
Core-Knowledge task (--task ck): facts read from a memory attached to a chat session.

A long-range document (nanochat/longrange.py) is cut into its history (filler, the fact at some
depth, filler, the question) and its answer's A tokens. Each method below reads the history and
is scored teacher forced over the answer span (horizon_nll with the answer as the horizon): the
document is retrieved when greedy argmax predicts every answer token; its nll is the mean over them.
  megacontext  the history's tree up to the shallowest level >= mc_config.max_level whose coarsest
               WC fits w_max (gistnet.AnyLevel serves the levels past the trained depth, see
               fitted_source), WorkingContext.recency_filled, then LensNet + FocusAllocator refocus
               it, as measure_sequences does
  truncation   the newest w_max tokens raw (WorkingContext.truncated)
  full         the whole history raw, the long layers' attention windows widened to cover it
               (evaluation.full_windows: the model's own windows, sequence_len, would make it a
               sliding window that cannot copy a fact more than one window back), only when history +
               answer fit the model's rotary table (model.cos.size(1)), else None. Past sequence_len it
               reads positions it never trained on: the ceiling a model with no memory limit would reach.

run_retrieval builds each cell's documents (evaluation.retrieval_documents), measures them and
returns the report mc_eval writes; recall_verdict is its one-line verdict. run_ck does the same for
--task ck (see its docstring).
"""

import random
import time

import torch

from nanochat.common import UserError, print0
from nanochat.gpt import norm
from nanochat.megacontext import BLOCK_SIZE
from nanochat.megacontext.evaluation import (full_windows, mc_working_contexts, retrieval_documents, start_working_contexts,
                                             val_texts)
from nanochat.megacontext.gistnet import AnyLevel
from nanochat.megacontext.horizon import MAX_SLOTS, SequenceSource, build_source, horizon_nll, length_chunks
from nanochat.megacontext.probes import digit_probe, fact_block, raw_blocks
from nanochat.megacontext.working_context import WorkingContext

K = BLOCK_SIZE
RETRIEVAL_TASKS = ("passkey", "kv-recall", "needle")  # the long-range kinds --task measures (needle: never trained on)
METHODS = ("megacontext", "truncation", "full")


def fitted_source(model, gistnet, history, w_max, recent_tokens, min_level):
    """history (N,) long -> (SequenceSource, level): its tree up to the shallowest level >= min_level
    whose coarsest WC costs <= w_max (gists by gistnet.AnyLevel, so past the trained depth the deepest
    trained level's weights), or up to the deepest level the history has when none fits (fit_budget
    then drops the oldest entries)."""
    depth = min_level
    while K ** (depth + 1) <= history.numel():
        depth += 1
    full = build_source(model, AnyLevel(gistnet), history, depth)
    level = next((L for L in range(min_level, depth + 1) if WorkingContext.coarsest(full, recent_tokens, L).cost <= w_max), depth)
    return SequenceSource(history, full.levels[:level + 1]), level


def answer_scores(model, wcs, sources, answers, max_slots=MAX_SLOTS):
    """-> one (correct, nll) per WC: whether greedy argmax predicts every token of its answer ((A,) long,
    teacher forced after the WC) and the answer's mean NLL. Answers of one length share forwards
    (horizon_nll needs one H), in chunks of at most max_slots padded slots (length_chunks)."""
    out = [None] * len(wcs)
    for A in sorted({a.numel() for a in answers}):
        group = [i for i, a in enumerate(answers) if a.numel() == A]
        for idx in length_chunks([wcs[i].cost + A - 1 for i in group], max_slots):
            rows = [group[j] for j in idx]
            targets = torch.stack([answers[i] for i in rows])  # (B, A)
            nll, logits, _ = horizon_nll(model, [wcs[i] for i in rows], [sources[i] for i in rows], list(targets),
                                         return_logits=True)  # (B, A), (B, A, V)
            hit = (logits.argmax(dim=-1) == targets).all(dim=-1).tolist()  # (B,)
            for j, i in enumerate(rows):
                out[i] = (hit[j], nll[j].mean().item())
    return out


@torch.no_grad()
def measure_retrieval(model, gistnet, lensnet, mc_config, histories, answers, refocus_iters=8, max_slots=MAX_SLOTS, seed=0):
    """histories: R (N_i,) long tensors on the model's device, each ending with its question; answers:
    R (A_i,) long tensors, the answer tokens that follow. -> (records, levels): records {method: R
    dicts (correct, nll)}, None for full where N_i + A_i exceeds the rotary table; levels: the gist
    level of each MegaContext tree (fitted_source)."""
    cfg = mc_config
    R = len(histories)
    fitted = [fitted_source(model, gistnet, h, cfg.w_max, cfg.recent_tokens, cfg.max_level) for h in histories]
    sources = [src for src, _ in fitted]
    mc, edits = mc_working_contexts(model, lensnet, cfg, sources, [L for _, L in fitted], refocus_iters, seed)
    start = start_working_contexts(cfg, sources, [L for _, L in fitted])  # before any refocus (WCs are values: still as built)
    jobs = []  # (sequence index, method, WC)
    for b, src in enumerate(sources):
        jobs += [(b, "megacontext", mc[b]), (b, "truncation", WorkingContext.truncated(src, cfg.w_max))]
    budgeted = answer_scores(model, [j[2] for j in jobs], [sources[j[0]] for j in jobs], [answers[j[0]] for j in jobs], max_slots)
    full = [(b, "full", WorkingContext.recent(src, src.num_tokens + K)) for b, src in enumerate(sources)
            if src.num_tokens + answers[b].numel() <= model.cos.size(1)]
    with full_windows(model, max((sources[b].num_tokens + answers[b].numel() for b, _, _ in full), default=0)):
        unbounded = answer_scores(model, [j[2] for j in full], [sources[j[0]] for j in full], [answers[j[0]] for j in full], max_slots)
    records = {method: [None] * R for method in METHODS}
    for (b, method, wc), (correct, nll) in zip(jobs + full, budgeted + unbounded):
        records[method][b] = dict(correct=correct, nll=nll)
        if method == "megacontext":  # the probes: is the fact raw in the refocused WC, was it before, how many edits
            block = fact_block(histories[b], answers[b])
            records[method][b].update(fact_raw=None if block is None else block in raw_blocks(wc),
                                      fact_raw_start=None if block is None else block in raw_blocks(start[b]),
                                      swaps=sum(len(step) for step in edits[b]))
    return records, [L for _, L in fitted]


def retrieval_summary(records):
    """A cell of records (dicts of measure_retrieval) -> dict(acc, nll, n): the fraction retrieved and
    the mean answer NLL; None when a record is None (the method did not run)."""
    if not records or any(r is None for r in records):
        return None
    n = len(records)
    out = dict(acc=sum(r["correct"] for r in records) / n, nll=sum(r["nll"] for r in records) / n, n=n)
    for key in ("fact_raw", "fact_raw_start"):  # megacontext: the fraction whose fact block the WC held raw (before refocus)
        found = [r[key] for r in records if r.get(key) is not None]
        if found:
            out[key] = sum(found) / len(found)
    if "swaps" in records[0]:
        out["swaps"] = sum(r["swaps"] for r in records) / n  # refocus edits per WC
    return out


@torch.no_grad()
def gist_digit_probe(model, gistnet, histories, answers, values):
    """Does the fact block's gist carry the answer? histories/answers as measure_retrieval takes them,
    values: each answer's digits as a string (the same length). -> {"gist": per-digit held-out accuracy
    of a linear probe (probes.digit_probe) from the fact block's LOD1 gist, "mean": the same from the
    block's mean normalized token embedding (what a plain mean pool keeps), "n": documents used};
    chance is 0.1 per digit."""
    gists, means, kept = [], [], []
    for history, answer, value in zip(histories, answers, values):
        block = fact_block(history, answer)
        if block is None or (block + 1) * K > history.numel():
            continue
        source = build_source(model, gistnet, history[:(block + 1) * K], 1)
        gists.append(source.levels[1][block].float())
        means.append(norm(model.embed_tokens(history[block * K:(block + 1) * K]).float()).mean(dim=0))
        kept.append(value)
    if len(kept) < 4:
        return {"gist": None, "mean": None, "n": len(kept)}
    return {"gist": digit_probe(torch.stack(gists), kept), "mean": digit_probe(torch.stack(means), kept), "n": len(kept)}


def recall_verdict(task_results, task, mult):
    """The one-line verdict at one history multiple, each method's accuracy averaged over the depths. The
    multiple is the history's length: a fact at depth d sits about (1 - d) x mult x W_max tokens back."""
    acc = {m: cell_mean([task_results[m][str(mult)]], "acc") for m in ("megacontext", "truncation", "full")}
    pct = {m: "n/a" if a is None else f"{100 * a:.0f}%" for m, a in acc.items()}
    depths = sorted(task_results["megacontext"][str(mult)], key=float)
    where = f"depth {depths[0]}" if len(depths) == 1 else f"depths {depths[0]}-{depths[-1]}"
    untrained = "" if acc["full"] is None or acc["full"] >= 0.5 else (
        ": full attention recalls under half, so this model has not learned the task (or its training diverged: its train "
        "log) and the comparison says nothing about MegaContext")
    return (f"MegaContext recalls {pct['megacontext']} over histories of {mult}x W_max on {task}, facts at {where} "
            f"(truncation {pct['truncation']}, full {pct['full']}){untrained}")


def cell_mean(tables, key):
    """The mean of key (acc or nll) over every cell of depth tables ({depth: cell}, None skipped), or None."""
    cells = [c for table in tables if table for c in table.values()]
    return sum(c[key] for c in cells) / len(cells) if cells else None


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


def run_ck(model, tokenizer, mc, gistnet, lensnet, entities, num_questions, refocus_iters=8, seed=0):
    """--task ck: a synthetic fact base read from a Core-Knowledge memory (nanochat/longrange.py facts,
    one document per entity, the memory built as scripts/mc_build_ck.py builds one). Per asked fact:
      ck / drop / oracle  the question with the memory attached, without it, and (no memory) with the
                          entity's document itself in front of the question: greedy accuracy and answer NLL;
                          CKRI = (L_drop - L_full) / L_full on the answer NLLs (the spec's CK reliance)
      poison              the memory attached and a conflicting statement of the fact in the session:
                          which value greedy decoding gives (session, ck or neither)
      update              the fact's value edited in the memory (tree.rewrite: same token count, gists
                          recomputed, no training step), asked again: the new value given, or still the old.
    -> (summary: the means, report: the summary, the settings and one row per question)."""
    from nanochat.longrange import Fact, fact_base, fact_documents, fact_question, fact_statement, fact_value
    from nanochat.megacontext.composite import ingest_documents
    from nanochat.megacontext.gistnet import AnyLevel
    from nanochat.megacontext.tree import MegaContextTree
    rng = random.Random(seed)
    facts = fact_base(rng, entities)
    docs = fact_documents(facts)  # {entity: text}
    memory = MegaContextTree(model.config.n_embd, AnyLevel(gistnet), model.embed_tokens, device=model.get_device())
    with torch.inference_mode():
        spans = dict(zip(docs, ingest_documents(memory, tokenizer, list(docs.values()))))
    asked = rng.sample(facts, min(num_questions, len(facts)))
    bos = tokenizer.get_bos_token_id()
    print0(f"mc_eval --task ck: w_max {mc.w_max} | {len(facts)} facts of {len(docs)} entities, "
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

    run = lambda prompt, answer, mem=None: ask(model, gistnet, lensnet, mc, prompt, answer, mem, refocus_iters)
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

    summary = ck_summary(rows, memory.num_tokens)
    report = dict(summary, entities=entities, refocus_iters=refocus_iters, seed=seed, w_max=mc.w_max,
                  mc_config=mc.to_dict(), rows=rows)
    return summary, report


def ck_summary(rows, memory_tokens):
    """run_ck's figures over its rows (one per question asked)."""
    mean = lambda key: sum(r[key] for r in rows) / len(rows)
    updated = [r["update"] for r in rows if r["update"] is not None]
    return dict(questions=len(rows), memory_tokens=memory_tokens,
                   acc_ck=mean("hit_ck"), acc_drop=mean("hit_drop"), acc_oracle=mean("hit_oracle"),
                   nll_full=mean("nll_ck"), nll_drop=mean("nll_drop"), nll_oracle=mean("nll_oracle"),
                   ckri=(mean("nll_drop") - mean("nll_ck")) / mean("nll_ck"), ck_slots=mean("ck_slots"),
                   poison_session_wins=sum(r["poison"] == "session" for r in rows) / len(rows),
                   poison_ck_wins=sum(r["poison"] == "ck" for r in rows) / len(rows),
                   updated=len(updated),  # the update figures are None (null) when no fact could be rewritten: nothing measured
                   update_followed=sum(u["hit_new"] for u in updated) / len(updated) if updated else None,
                   update_old_kept=sum(u["hit_old"] for u in updated) / len(updated) if updated else None)


def run_retrieval(model, tokenizer, mc, gistnet, lensnet, tasks, mults, depths, num_docs, refocus_iters=8, seed=0,
                  probe_docs=0, device="cpu"):
    """Retrieval accuracy per task, method, history multiple and depth: for each multiple m (history
    m x w_max tokens) and depth, num_docs documents of the task (evaluation.retrieval_documents, each
    cell's own seeded RNG) measured by measure_retrieval; with "passkey" among the tasks and
    probe_docs >= 4, also gist_digit_probe on that many recall rows. Progress lines as it goes.
    -> the report: results {task: {method: {mult: {depth: cell} or None}}}, the verdicts at 8x and 16x,
    chance, mc_levels, full_skipped, probes and the settings."""
    from nanochat.longrange import num_answers
    from nanochat.recall import recall_eval_docs
    table = model.cos.size(1)
    print0(f"mc_eval --task {'/'.join(tasks)}: w_max {mc.w_max} | mults {mults} | depths {depths} | "
           f"{num_docs} documents per cell | full attention reads the whole history (windows widened) up to the rotary table, {table}")
    texts = val_texts()
    results = {task: {method: {} for method in METHODS} for task in tasks}
    full_skipped, mc_levels = {}, {}
    for task in tasks:
        for mult in mults:
            t1 = time.time()
            history = mult * mc.w_max
            histories, answers, depth_of = [], [], []
            for depth in depths:
                rng = random.Random(f"{seed}/{task}/{mult}/{depth:g}")  # each cell's documents, whatever else runs
                for ids, answer in retrieval_documents(tokenizer, texts, task, depth, history, num_docs, rng):
                    histories.append(torch.tensor(ids, dtype=torch.long, device=device))
                    answers.append(torch.tensor(answer, dtype=torch.long, device=device))
                    depth_of.append(depth)
            records, levels = measure_retrieval(model, gistnet, lensnet, mc, histories, answers, refocus_iters, seed=seed)
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
                cells = results[task][method][str(mult)]
                line.append(f"{method} n/a" if cells is None else
                            f"{method} acc {cell_mean([cells], 'acc'):.3f} nll {cell_mean([cells], 'nll'):.3f}"
                            + (f" fact raw {cell_mean([cells], 'fact_raw_start'):.2f} -> {cell_mean([cells], 'fact_raw'):.2f}"
                               f" ({cell_mean([cells], 'swaps'):.1f} swaps)" if method == "megacontext"
                               and all("fact_raw" in c and "fact_raw_start" in c for c in cells.values()) else ""))
            print0(f"{task:9s} {mult:3d}x ({history:6d} tokens, LOD{mc_levels[str(mult)]}): " + " | ".join(line) +
                   f" | {time.time() - t1:.1f}s")

    probes = None
    if "passkey" in tasks and probe_docs >= 4:  # does the fact block's gist carry the digits? (probes.digit_probe)
        docs = recall_eval_docs(tokenizer, 4 * mc.w_max, probe_docs, seed=seed)
        probes = gist_digit_probe(model, gistnet, [torch.tensor(h, device=device) for h, _ in docs],
                                  [torch.tensor(a, device=device) for _, a in docs],
                                  [tokenizer.decode(a).strip(" .") for _, a in docs])
        if probes["gist"] is not None:
            print0(f"digit probe ({probes['n']} facts, chance 0.10 per digit): from the fact block's gist "
                   + " ".join(f"{v:.2f}" for v in probes["gist"]) + " | from its mean token embedding "
                   + " ".join(f"{v:.2f}" for v in probes["mean"]))
    return dict(tasks=list(tasks), methods=list(METHODS), mults=mults, depths=depths, num_docs=num_docs, w_max=mc.w_max,
                history_tokens={str(m): m * mc.w_max for m in mults}, refocus_iters=refocus_iters, seed=seed,
                mc_config=mc.to_dict(), mc_levels=mc_levels, sequence_len=model.config.sequence_len, rotary_table=table,
                chance={task: 1 / num_answers(task) for task in tasks}, results=results,
                full_skipped=full_skipped, probes=probes,
                verdicts=[recall_verdict(results[task], task, m) for task in tasks for m in mults if m in (8, 16)])


def retrieval_summary_line(report, mult):
    """{acc_<method>, nll_<method>, acc_chance} at one history multiple, over the report's tasks and depths."""
    out = {}
    for key in ("acc", "nll"):
        for method in METHODS:
            out[f"{key}_{method}"] = cell_mean([report["results"][task][method][str(mult)] for task in report["tasks"]], key)
    out["acc_chance"] = sum(report["chance"].values()) / len(report["tasks"])
    return out
