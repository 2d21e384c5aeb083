"""
Reinforcement learning on math word problems: simple on-policy REINFORCE.

    python -m scripts.chat_rl                      # offline: synthetic arithmetic (calculator tool)
    python -m scripts.chat_rl --task GSM8K         # the real GSM8K (downloaded dataset)
    torchrun --standalone --nproc_per_node=8 scripts/chat_rl.py --task GSM8K

Each step samples num_samples answers per problem from the current model, rewards each
(1 if the final "#### n" is right), and raises the log-probability of the sampled tokens in
proportion to reward - mean reward of that problem's samples. Tokens the calculator tool
forced into the stream are not the policy's choices and get no gradient. No KL penalty, no
ratio clipping: every sample is used once, on-policy.
"""

import os
import sys
import time
import argparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from nanochat.common import (require_at_least_one, UserError, cli_main, compute_init, compute_cleanup, get_base_dir, print0, autodetect_device_type,
                             all_reduce_mean, report_stale_temps)
from nanochat.checkpoint_manager import claim_checkpoint_dir, load_model, resolve_checkpoint, retire_checkpoints, save_checkpoint
from nanochat.engine import Engine, temperature_problem
from nanochat.runlog import RunLog
from nanochat.optim import set_lr_multiplier


def make_task(name, split):
    if name == "Arithmetic":
        from tasks.arithmetic import Arithmetic
        return Arithmetic(split=split, size=10000 if split == "train" else 500)
    if name == "GSM8K":
        from tasks.gsm8k import GSM8K
        return GSM8K(subset="main", split=split)
    raise UserError(f"unknown --task {name!r} (expected Arithmetic or GSM8K)")


def rollout(engine, tokenizer, conversation, task, num_samples, max_tokens, temperature, seed):
    """-> (sequences: list of prompt+answer token lists, policy_masks: 1 on sampled answer tokens, rewards)"""
    prompt = tokenizer.render_for_completion(conversation)
    results, masks = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_tokens, keep_stop=True,
                                           temperature=temperature, top_k=None, seed=seed)
    sequences, policy_masks, rewards = [], [], []
    for tokens, mask in zip(results, masks):  # a sampled stop token stays: it is part of the action
        answer = tokens[len(prompt):]
        if answer and answer[-1] in engine.stop_tokens:
            answer = answer[:-1]
        rewards.append(task.reward(conversation, tokenizer.decode(answer)))
        sequences.append(tokens)
        policy_masks.append(mask)
    return sequences, policy_masks, rewards


def policy_loss(model, sequences, policy_masks, advantages, pad_id):
    """-sum(advantage * log p(sampled token)) over policy tokens, divided by their count."""
    T = max(len(s) for s in sequences)
    device = model.get_device()
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), T)
    for i, (s, m) in enumerate(zip(sequences, policy_masks)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(m)] = torch.tensor(m, dtype=torch.float)
    ids, mask = ids.to(device), mask.to(device)
    inputs, targets, mask = ids[:, :-1], ids[:, 1:], mask[:, 1:]  # (N, T-1): token t+1 is chosen at t
    logp = -model(inputs, targets, loss_reduction="none")  # (N, T-1) log p(target)
    adv = torch.tensor(advantages, dtype=logp.dtype, device=device)[:, None]
    return -(logp * adv * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def pass_at_1(engine, tokenizer, task, n, max_tokens, rank, world_size):
    correct = torch.zeros(2, device=engine.model.get_device())
    for i in range(rank, n, world_size):
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        results, _ = engine.generate_batch(prompt, num_samples=1, max_tokens=max_tokens, temperature=0)
        correct[0] += float(task.evaluate(conversation, tokenizer.decode(results[0][len(prompt):])))
        correct[1] += 1
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(correct)
    return (correct[0] / correct[1].clamp(min=1)).item()


def main():
    p = argparse.ArgumentParser(description="On-policy REINFORCE on math word problems", allow_abbrev=False)
    p.add_argument("--run", type=str, default="dummy")
    p.add_argument("--device-type", type=str, default="")
    p.add_argument("--source", type=str, default="sft", choices=["sft", "rl"])
    p.add_argument("--model-tag", type=str, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace the RL checkpoints already under this model tag (else it refuses)")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--task", type=str, default="Arithmetic", help="Arithmetic (offline) | GSM8K")
    p.add_argument("--num-iterations", type=int, default=100)
    p.add_argument("--problems-per-step", type=int, default=4, help="per rank")
    p.add_argument("--num-samples", type=int, default=8, help="answers sampled per problem")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--init-lr-frac", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps (<= 0: only at the end)")
    p.add_argument("--eval-problems", type=int, default=100)
    args = p.parse_args()
    require_at_least_one(p, args, "num_iterations", "problems_per_step", "num_samples", "max_new_tokens", "eval_problems")
    if args.init_lr_frac <= 0:
        p.error("--init-lr-frac must be positive")
    if args.temperature <= 0 or temperature_problem(args.temperature):  # rollouts sample: greedy (0) would give one answer
        p.error(temperature_problem(args.temperature) if args.temperature > 0 else "--temperature must be positive (rollouts sample)")
    user_config = vars(args).copy()

    is_ddp, rank, _, world_size, device = compute_init(args.device_type or autodetect_device_type())
    try:
        _, model_tag, step = resolve_checkpoint(args.source, args.model_tag, args.step)  # the tag loaded names the output
        model, tokenizer, meta = load_model(args.source, device, phase="train", model_tag=model_tag, step=step)
        engine = Engine(model, tokenizer)
        train_task, test_task = make_task(args.task, "train"), make_task(args.task, "test")
        optimizers = model.setup_optimizers(weight_decay=0.0, lr_multiplier=args.init_lr_frac)
        checkpoint_dir = os.path.join(get_base_dir(), "chatrl_checkpoints", model_tag)
        if rank == 0:
            report_stale_temps(checkpoint_dir)  # what a killed save left (this run is the one writer here)
        replaced = claim_checkpoint_dir(checkpoint_dir, args.overwrite, rank=rank)  # removed once this run has saved
        log = RunLog(os.path.join(checkpoint_dir, "train_log.jsonl"), run=args.run, user_config=user_config, enabled=rank == 0, fresh=True)
        pad_id = tokenizer.get_bos_token_id()
        n_eval = min(args.eval_problems, len(test_task))

        accuracy, t_start = None, time.time()
        for step in range(args.num_iterations + 1):
            last = step == args.num_iterations
            if last or (args.eval_every > 0 and step % args.eval_every == 0):
                model.eval()
                accuracy = pass_at_1(engine, tokenizer, test_task, n_eval, args.max_new_tokens, rank, world_size)
                model.train()
                print0(f"step {step:05d} | {args.task} pass@1 {100 * accuracy:.1f}% ({n_eval} problems)")
                log.write(step=step, kind="eval", pass_at_1=accuracy)
            if last:
                break
            t0 = time.time()
            rewards_seen = []
            for j in range(args.problems_per_step):
                index = ((step * args.problems_per_step + j) * world_size + rank) % len(train_task)
                conversation = train_task[index]
                model.eval()
                sequences, masks, rewards = rollout(engine, tokenizer, conversation, train_task, args.num_samples,
                                                    args.max_new_tokens, args.temperature, seed=hash((step, j, rank)) % 2**31)
                model.train()
                mean = sum(rewards) / len(rewards)
                advantages = [r - mean for r in rewards]
                rewards_seen += rewards
                if any(a != 0 for a in advantages):  # all-equal rewards carry no signal
                    (policy_loss(model, sequences, masks, advantages, pad_id) / args.problems_per_step).backward()
            if is_ddp:
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
                all_reduce_mean(grads, world_size)
                for p, g in zip(model.parameters(), grads):
                    p.grad = g
            lrm = 1.0 - step / args.num_iterations
            set_lr_multiplier(optimizers, lrm)
            if any(p.grad is not None for p in model.parameters()):
                for opt in optimizers:
                    opt.step()
            model.zero_grad(set_to_none=True)
            mean_reward = sum(rewards_seen) / len(rewards_seen)
            print0(f"step {step + 1:05d}/{args.num_iterations:05d} | mean reward {mean_reward:.3f} | dt {time.time() - t0:.1f}s")
            log.write(step=step + 1, kind="train", mean_reward=mean_reward, lr_mult=lrm)

        meta_out = dict(step=args.num_iterations, pass_at_1=accuracy, task=args.task, model_config=model.config.to_dict(),
                        user_config=user_config, model_tag=model_tag, source=dict(kind=args.source, step=meta.get("step")),
                        tokenizer_fingerprint=tokenizer.fingerprint())
        save_checkpoint(checkpoint_dir, args.num_iterations, model.state_dict(), None, meta_out, rank=rank)
        retire_checkpoints(checkpoint_dir, replaced, args.num_iterations, rank)
        print0(f"saved RL checkpoint to {checkpoint_dir}")
        from nanochat.report import get_report
        get_report().log(section="Chat RL", data=[user_config, {"model_tag": model_tag, f"{args.task} pass@1": accuracy,
                                                                 "wall_clock_s": round(time.time() - t_start, 1)}])
        log.finish()
    finally:
        compute_cleanup()


if __name__ == "__main__":
    cli_main(main)
