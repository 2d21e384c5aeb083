"""
Evaluate a chat model on tasks.

    python -m scripts.chat_eval -i sft -a Arithmetic,Spelling          # offline tasks (no download)
    python -m scripts.chat_eval -i sft                                 # ARC-Easy/Challenge, MMLU, GSM8K, HumanEval
    python -m scripts.chat_eval -i sft -a HumanEval-harness            # HumanEval by the official harness's program
    torchrun --standalone --nproc_per_node=8 scripts/chat_eval.py -i sft

Categorical tasks (multiple choice) are scored without sampling: the letter with the highest
logit after <|assistant_start|>, among the question's letters. Generative tasks sample an
answer with the engine (calculator tool on) and let the task check it. ChatCORE is the mean
over tasks of the accuracy centered by the random-guess baseline: upstream's 0.25 for ARC and MMLU,
1/choices for another multiple-choice task, 0 for generative tasks. Over the default tasks it is printed
as ChatCORE-5: upstream's ChatCORE also averages a sixth task, SpellingBee (built on a downloaded word
list this project does not ship), so the two means differ by definition; each task's accuracy compares.
"""

import os
import sys
import argparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

from nanochat.common import UserError, cli_main, compute_init, compute_cleanup, get_base_dir, print0, autodetect_device_type, atomic_write_json
from nanochat.checkpoint_manager import load_model, resolve_checkpoint
from nanochat.engine import Engine, temperature_problem

OFFLINE_TASKS = ["Arithmetic", "Spelling"]
ONLINE_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"]
EXTRA_TASKS = ["HumanEval-harness"]  # not in ChatCORE: the official harness's program (tasks/humaneval.py)
CHANCE = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25}  # upstream's fixed baselines (a few ARC questions have 3 or 5 choices)


def make_task(name):
    if name == "Arithmetic":
        from tasks.arithmetic import Arithmetic
        return Arithmetic(split="test", size=1000)
    if name == "Spelling":
        from tasks.spelling import Spelling
        return Spelling(split="test", size=1000)
    if name in ("ARC-Easy", "ARC-Challenge"):
        from tasks.arc import ARC
        return ARC(subset=name, split="test")
    if name == "MMLU":
        from tasks.mmlu import MMLU
        return MMLU(subset="all", split="test")
    if name == "GSM8K":
        from tasks.gsm8k import GSM8K
        return GSM8K(subset="main", split="test")
    if name in ("HumanEval", "HumanEval-harness"):
        from tasks.humaneval import HumanEval
        return HumanEval(rule="upstream" if name == "HumanEval" else "harness")
    raise UserError(f"unknown task {name!r} (known: {', '.join(OFFLINE_TASKS + ONLINE_TASKS + EXTRA_TASKS)})")


@torch.no_grad()
def categorical_correct(model, tokenizer, conversation):
    """Pick the letter whose token has the highest logit right after <|assistant_start|>."""
    tokens = tokenizer.render_for_completion(conversation)
    logits = model(torch.tensor([tokens], dtype=torch.long, device=model.get_device()))[0, -1]  # (vocab,)
    letter_ids = [tokenizer.encode(letter)[0] for letter in conversation["letters"]]
    choice = conversation["letters"][int(torch.argmax(logits[letter_ids]))]
    return choice == conversation["messages"][-1]["content"]


def generative_correct(engine, tokenizer, task, conversation, num_samples, max_tokens, temperature, top_k, seed):
    """Sample answers; correct if any sample passes the task's check (pass@num_samples)."""
    tokens = tokenizer.render_for_completion(conversation)
    results, _ = engine.generate_batch(tokens, num_samples=num_samples, max_tokens=max_tokens,
                                       temperature=temperature, top_k=top_k, seed=seed)
    answers = [tokenizer.decode(r[len(tokens):]) for r in results]
    return any(task.evaluate(conversation, a) for a in answers)


def evaluate_task(model, tokenizer, engine, task, max_problems, args, rank=0, world_size=1):
    n = len(task) if max_problems < 0 else min(max_problems, len(task))
    counts = torch.zeros(2, dtype=torch.long, device=model.get_device())  # (correct, total)
    for i in range(rank, n, world_size):
        conversation = task[i]
        if task.eval_type == "categorical":
            ok = categorical_correct(model, tokenizer, conversation)
        else:
            ok = generative_correct(engine, tokenizer, task, conversation, args.num_samples, args.max_new_tokens,
                                    args.temperature, args.top_k, seed=args.seed + i)
        counts[0] += int(bool(ok))
        counts[1] += 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    correct, total = counts.tolist()
    return correct / max(total, 1)


def random_baseline(name, task):
    """Chance accuracy: upstream's constant where it has one, else 1/choices averaged over a sample of
    questions for multiple choice, 0 for generative tasks."""
    if name in CHANCE:
        return CHANCE[name]
    if task.eval_type != "categorical":
        return 0.0
    sample = [task[i] for i in range(min(len(task), 100))]
    return sum(1 / len(c["letters"]) for c in sample) / max(len(sample), 1)


def main():
    p = argparse.ArgumentParser(description="Evaluate a chat model on tasks", allow_abbrev=False)
    p.add_argument("-i", "--source", type=str, default="sft", choices=["base", "sft", "rl"])
    p.add_argument("-g", "--model-tag", type=str, default=None)
    p.add_argument("-s", "--step", type=int, default=None)
    p.add_argument("-a", "--tasks", type=str, default=",".join(ONLINE_TASKS), help="comma list of tasks")
    p.add_argument("-x", "--max-problems", type=int, default=-1, help="per task (-1: all)")
    p.add_argument("-n", "--num-samples", type=int, default=1)
    p.add_argument("-t", "--temperature", type=float, default=0.0)
    p.add_argument("-k", "--top-k", type=int, default=50)
    p.add_argument("-m", "--max-new-tokens", type=int, default=512)  # upstream's budget: GSM8K reasoning and whole functions fit
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device-type", type=str, default="")
    args = p.parse_args()
    if args.max_problems == 0 or args.max_problems < -1:
        p.error(f"--max-problems must be at least 1 (-1: all), got {args.max_problems}")
    if args.num_samples < 1 or args.max_new_tokens < 1 or args.top_k < 1:
        p.error("--num-samples, --max-new-tokens and --top-k must be at least 1")
    if temperature_problem(args.temperature):
        p.error(temperature_problem(args.temperature))
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:  # it scored nothing and wrote ChatCORE NaN over the last results
        p.error(f"--tasks names no task, got {args.tasks!r}")

    _, rank, _, world_size, device = compute_init(args.device_type or autodetect_device_type())
    try:
        tasks = {name: make_task(name) for name in names}
        _, tag, step = resolve_checkpoint(args.source, args.model_tag, args.step)  # the tag loaded names the results
        model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=tag, step=step)
        engine = Engine(model, tokenizer)
        results, centered = {}, {}
        for name, task in tasks.items():
            acc = evaluate_task(model, tokenizer, engine, task, args.max_problems, args, rank, world_size)
            base = random_baseline(name, task)
            results[name], centered[name] = acc, (acc - base) / (1 - base)
            print0(f"{name}: {100 * acc:.2f}% (random {100 * base:.1f}%)")
        chatcore = sum(centered.values()) / len(centered) if centered else float("nan")
        # ChatCORE-5 is the default tasks' figure, all their problems (upstream's ChatCORE less SpellingBee); over
        # other tasks or -x problems it is named for what it averages, and so is its results file (never the full run's)
        full = names == ONLINE_TASKS and args.max_problems == -1
        subset = "" if full else "-".join(names) + ("" if args.max_problems == -1 else f"_x{args.max_problems}")
        label = "ChatCORE-5" if full else f"ChatCORE over {', '.join(names)}" + (
            "" if args.max_problems == -1 else f" ({args.max_problems} problems each)")
        print0(f"{label}: {chatcore:.4f}")
        if rank == 0:
            out = os.path.join(get_base_dir(), "chat_eval", f"{args.source}_{tag}_{meta.get('step')}{'_' + subset if subset else ''}.json")
            atomic_write_json(dict(source=args.source, model_tag=tag, step=meta.get("step"), results=results,
                                   centered=centered, chatcore=chatcore, tasks=names, full=full, user_config=vars(args)), out)
            print0(f"wrote {out}")
            from nanochat.report import get_report
            # a subset's section of its own: a smoke run (-x 1) never replaces the full run's figures in the report
            section = f"Chat evaluation {args.source}" + ("" if full else ": " + label.removeprefix("ChatCORE over "))
            get_report().log(section=section, data=[{"model_tag": tag, "step": meta.get("step"), **results, label: chatcore}])
        return results
    finally:
        compute_cleanup()


if __name__ == "__main__":
    cli_main(main)
