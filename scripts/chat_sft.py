"""
Supervised fine-tuning: turn a base model into a chat model on a mixture of conversations.

    python -m scripts.chat_sft                          # offline mixture (arithmetic, spelling, identity)
    python -m scripts.chat_sft --mixture full           # + SmolTalk, MMLU, GSM8K (downloaded datasets)
    torchrun --standalone --nproc_per_node=8 scripts/chat_sft.py --mixture full

Sizes (depth, sequence length, vocab) come from the base checkpoint. Rows are packed best-fit
with whole conversations and padded with BOS; the loss counts only assistant tokens
(the tokenizer's mask), so padding, user turns and tool outputs are never trained on.

The defaults are upstream nanochat's recipe: one epoch of the mixture (the data ends the run);
the device and total batch and the embedding / unembedding / matrix rates of the checkpoint's
own run (its meta; 32 rows, 2^19 tokens, 0.3 / 0.008 / 0.02 where it has none), each rate x 0.8;
the learning rate flat for the first half of the epoch, then linearly to 0 (progress = the share
of conversations used); Muon momentum 0.85 -> 0.95 over the first 300 steps; the optimizer's
state (moments, step counts) carried over from the checkpoint's run. The CPU jobs use it too:
one epoch of the offline mixture is ~70 steps of the CPU presets' 8 x 1024 tokens. A shorter
recipe is flags: e.g. --num-iterations 400 --device-batch-size 2 --total-batch-size 2048
--init-lr-frac 0.5 --warmdown-ratio 1 --momentum-ramp-steps 0 --load-optimizer 0 and the
three rates (the CPU jobs' recipe before: a linear decay over 400 steps of 2 rows, fresh
optimizer at momentum 0.95).
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
from nanochat.runlog import RunLog
from nanochat.optim import set_lr_multiplier


def build_mixture(name, split):
    """The SFT mixture: "offline" needs no download; "full" adds the real chat datasets."""
    from tasks.common import TaskMixture
    from tasks.arithmetic import Arithmetic
    from tasks.spelling import Spelling
    from tasks.identity import Identity
    if split == "train":
        tasks = [Arithmetic(split="train", stop=4000), Spelling(split="train", stop=2000), Identity(), Identity()]
    else:
        tasks = [Arithmetic(split="test", stop=200), Spelling(split="test", stop=100)]
    if name == "full":
        from tasks.smoltalk import SmolTalk
        from tasks.mmlu import MMLU
        from tasks.gsm8k import GSM8K
        tasks += [SmolTalk(split=split), MMLU(subset="auxiliary_train", split="train") if split == "train" else MMLU(subset="all", split="test", stop=1000),
                  GSM8K(subset="main", split=split)]
    elif name != "offline":
        raise UserError(f"unknown --mixture {name!r} (expected offline or full)")
    return TaskMixture(tasks)


def sft_batches(dataset, tokenizer, B, T, device, rank=0, world_size=1, buffer_size=100):
    """Infinite (inputs [B, T], targets [B, T], used) batches. Each row of T+1 tokens is filled
    best-fit with whole rendered conversations (the largest that fits, the earliest of equal
    lengths, from a buffer), then padded with BOS; targets are -1 wherever the next token is
    not an assistant token. used: conversations placed so far by all ranks (rank + world_size
    per conversation this rank placed, as upstream counts an epoch's progress)."""
    bos = tokenizer.get_bos_token_id()
    buffer = []  # [(ids, mask)]
    index = used = rank
    # upstream renders at most 2,048 tokens; a shorter row crops to its own length (else a longer conversation never fits)
    max_tokens = min(T + 1, 2048)

    def refill():
        nonlocal index
        while len(buffer) < buffer_size:
            ids, mask = tokenizer.render_conversation(dataset[index % len(dataset)], max_tokens=max_tokens)
            buffer.append((ids, mask))
            index += world_size

    while True:
        rows, masks = [], []
        for _ in range(B):
            refill()
            row, row_mask = [], []
            while True:
                space = T + 1 - len(row)
                fits = [i for i, (ids, _) in enumerate(buffer) if len(ids) <= space]
                if not fits:
                    break
                ids, mask = buffer.pop(max(fits, key=lambda i: len(buffer[i][0])))
                row += ids
                row_mask += mask
                used += world_size
                refill()
            row += [bos] * (T + 1 - len(row))  # BOS padding, never a target
            row_mask += [0] * (T + 1 - len(row_mask))
            rows.append(row)
            masks.append(row_mask)
        batch = torch.tensor(rows, dtype=torch.long)      # (B, T+1)
        mask = torch.tensor(masks, dtype=torch.bool)      # (B, T+1)
        inputs = batch[:, :-1]
        targets = batch[:, 1:].masked_fill(~mask[:, 1:], -1)
        yield inputs.to(device), targets.to(device), used


def sft_loss(model, x, y):
    """Mean loss per assistant token; a batch with no assistant tokens (all targets -1) gives 0, not NaN.
    The head runs at the assistant tokens alone (~56% of the offline mixture's): a micro-batch's forward and
    backward -18% on one CPU thread (README, "On an AVX2-only CPU")."""
    return model(x, y, loss_reduction="sum", scored_only=True) / (y >= 0).sum().clamp(min=1)


@torch.no_grad()
def evaluate_loss(model, batches, steps):
    """Mean loss per assistant token over `steps` batches (all ranks together)."""
    sums = torch.zeros(2, dtype=torch.float64, device=model.get_device())
    for _ in range(steps):
        x, y, _ = next(batches)
        loss = model(x, y, loss_reduction="none")
        sums[0] += loss.sum().double()
        sums[1] += (y >= 0).sum()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    return (sums[0] / sums[1].clamp(min=1)).item()


def lr_multiplier(progress, warmup_ratio, warmdown_ratio, final_lr_frac):
    """Upstream's SFT schedule over progress in [0, 1]: a linear warmup, flat, then linearly to final_lr_frac."""
    if progress < warmup_ratio:
        return (progress + 1e-8) / warmup_ratio
    if progress <= 1.0 - warmdown_ratio:
        return 1.0
    decay = (progress - (1.0 - warmdown_ratio)) / warmdown_ratio
    return (1.0 - decay) + decay * final_lr_frac


def muon_momentum(step, ramp_steps):
    """0.85 -> 0.95 over the first ramp_steps steps (0: 0.95 throughout)."""
    frac = 1.0 if ramp_steps <= 0 else min(step / ramp_steps, 1.0)
    return (1.0 - frac) * 0.85 + frac * 0.95


def warm_start(optimizers, path, device, weight_decay=None):
    """The checkpoint run's optimizer state (moments, step counts, and as upstream its groups' weight decays:
    the base run's last scheduled Muon decay, ~0 at its end) into this run's optimizers, keeping their fresh
    learning rates; weight_decay (--weight-decay given): the fresh groups' decays are kept too. False if there
    is none."""
    from nanochat.common import load_torch_file
    from nanochat.optim import load_optimizer_state
    if not os.path.exists(path):
        return False
    states = load_torch_file(path, device, what="optimizer state").get("optimizers")
    if not isinstance(states, list) or len(states) != len(optimizers):
        raise UserError(f"cannot warm-start the optimizer from {path}: not {len(optimizers)} optimizer states "
                        f"(--load-optimizer 0 starts a fresh one)")
    for opt, state in zip(optimizers, states):
        decays = [g["weight_decay"] for g in opt.param_groups]
        try:  # another model's or another world size's state is refused in one line; the fresh rates stay
            load_optimizer_state(opt, state, path)
        except UserError as e:
            raise UserError(f"{e} (--load-optimizer 0 starts a fresh optimizer)") from None
        if weight_decay is not None:
            for group, decay in zip(opt.param_groups, decays):
                group["weight_decay"] = decay
    return True


def main():
    p = argparse.ArgumentParser(description="Supervised fine-tuning of a base model", allow_abbrev=False)
    p.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb)")
    p.add_argument("--device-type", type=str, default="")
    p.add_argument("--source", type=str, default="base", choices=["base", "sft"], help="checkpoints to start from")
    p.add_argument("--model-tag", type=str, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace the SFT checkpoints already under this model tag (else it refuses)")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--mixture", type=str, default="offline", help="offline | full")
    p.add_argument("--device-batch-size", type=int, default=-1, help="rows per micro-batch (-1: the checkpoint run's)")
    p.add_argument("--total-batch-size", type=int, default=-1, help="tokens per step, all ranks (-1: the checkpoint run's)")
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: one epoch of the mixture)")
    p.add_argument("--init-lr-frac", type=float, default=0.8, help="learning rates = the rates below x this, then scheduled")
    p.add_argument("--embedding-lr", type=float, default=-1, help="-1: the checkpoint run's")
    p.add_argument("--unembedding-lr", type=float, default=-1, help="-1: the checkpoint run's")
    p.add_argument("--matrix-lr", type=float, default=-1, help="-1: the checkpoint run's")
    p.add_argument("--scalar-lr", type=float, default=0.5)
    p.add_argument("--weight-decay", type=float, default=None, help="Muon weight decay (default: a carried-over "
                   "optimizer state's, the base run's last scheduled value, as upstream; 0 for a fresh optimizer)")
    p.add_argument("--warmup-ratio", type=float, default=0.0, help="share of the run warming the rate up")
    p.add_argument("--warmdown-ratio", type=float, default=0.5, help="share of the run decaying it to --final-lr-frac")
    p.add_argument("--final-lr-frac", type=float, default=0.0)
    p.add_argument("--momentum-ramp-steps", type=int, default=300, help="Muon momentum 0.85 -> 0.95 over these steps (0: 0.95)")
    p.add_argument("--load-optimizer", type=int, default=1, choices=[0, 1], help="1: carry over the checkpoint run's optimizer state")
    p.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps (<= 0: only at the end)")
    p.add_argument("--eval-steps", type=int, default=8)
    args = p.parse_args()
    require_at_least_one(p, args, "eval_steps")
    if args.device_batch_size == 0 or args.device_batch_size < -1 or args.total_batch_size == 0 or args.total_batch_size < -1 \
            or args.num_iterations == 0 or args.num_iterations < -1:
        p.error("--device-batch-size, --total-batch-size and --num-iterations must be at least 1 (or -1)")
    if args.init_lr_frac <= 0:
        p.error("--init-lr-frac must be positive")
    if not (0 <= args.warmup_ratio and 0 <= args.warmdown_ratio and args.warmup_ratio + args.warmdown_ratio <= 1):
        p.error("--warmup-ratio and --warmdown-ratio must be >= 0 and sum to at most 1")
    user_config = vars(args).copy()

    is_ddp, rank, _, world_size, device = compute_init(args.device_type or autodetect_device_type())
    try:
        source_dir, model_tag, source_step = resolve_checkpoint(args.source, args.model_tag, args.step)  # the tag loaded names the output
        model, tokenizer, meta = load_model(args.source, device, phase="train", model_tag=model_tag, step=source_step)
        config = model.config
        # what the checkpoint's run used, where a flag says -1 (upstream's values where its meta has none)
        ran = meta.get("user_config") if isinstance(meta.get("user_config"), dict) else {}
        inherited = dict(device_batch_size=meta.get("device_batch_size", 32), total_batch_size=meta.get("total_batch_size", 2 ** 19),
                         embedding_lr=ran.get("embedding_lr", 0.3), unembedding_lr=ran.get("unembedding_lr", 0.008),
                         matrix_lr=ran.get("matrix_lr", 0.02))
        for key, value in inherited.items():
            if getattr(args, key) == -1:
                setattr(args, key, value)
        user_config.update({key: getattr(args, key) for key in inherited})  # the values this run used
        T, B = config.sequence_len, args.device_batch_size
        if args.total_batch_size % (B * T * world_size):
            raise UserError(f"--total-batch-size {args.total_batch_size} is not a multiple of {B} rows x {T} tokens x "
                            f"{world_size} ranks")
        grad_accum_steps = args.total_batch_size // (B * T * world_size)
        optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr, matrix_lr=args.matrix_lr,
                                            weight_decay=args.weight_decay or 0.0, scalar_lr=args.scalar_lr, lr_multiplier=args.init_lr_frac)
        if args.load_optimizer:
            optim_path = os.path.join(source_dir, f"optim_{source_step:06d}_rank{rank:d}.pt")
            have = torch.tensor(int(os.path.exists(optim_path)), device=device)
            if is_ddp:  # every rank decides alike: a rank with no shard of its own would train fresh beside the others
                torch.distributed.all_reduce(have)
            if 0 < have.item() < world_size:
                raise UserError(f"the checkpoint's run saved optimizer state for {have.item()} of this run's {world_size} ranks "
                                f"({source_dir}): run on as many ranks as it did, or pass --load-optimizer 0")
            print0(f"optimizer state carried over from {optim_path}" if warm_start(optimizers, optim_path, device, args.weight_decay)
                   else f"no optimizer state at {optim_path}: a fresh optimizer")

        train_set, val_set = build_mixture(args.mixture, "train"), build_mixture(args.mixture, "test")
        epoch_run = args.num_iterations == -1
        length = "one epoch" if epoch_run else f"{args.num_iterations} steps"
        print0(f"SFT of {args.source} {model_tag}: {len(train_set):,} train / {len(val_set):,} val conversations, "
               f"{length} of {B} x {T} x {grad_accum_steps} x {world_size} tokens")
        train_batches = sft_batches(train_set, tokenizer, B, T, device, rank, world_size)
        checkpoint_dir = os.path.join(get_base_dir(), "chatsft_checkpoints", model_tag)
        if rank == 0:
            report_stale_temps(checkpoint_dir)  # what a killed save left (this run is the one writer here)
        replaced = claim_checkpoint_dir(checkpoint_dir, args.overwrite, rank=rank)  # removed once this run has saved
        log = RunLog(os.path.join(checkpoint_dir, "train_log.jsonl"), run=args.run, user_config=user_config, enabled=rank == 0, fresh=True)

        # As upstream: the next micro-batch is always fetched ahead, so the data's end is known before the step that would
        # need it (that step is not taken) and an epoch's progress counts the conversations fetched for the next micro-batch
        x, y, used = next(train_batches)
        progress, finished, step = 0.0, False, 0
        val_loss, t_start = None, time.time()
        while True:
            if epoch_run and is_ddp:  # every rank stops at the same step
                flag = torch.tensor(int(finished), device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                finished = bool(flag.item())
            last = finished if epoch_run else step == args.num_iterations
            if last or (args.eval_every > 0 and step % args.eval_every == 0):
                model.eval()
                val_loss = evaluate_loss(model, sft_batches(val_set, tokenizer, B, T, device, rank, world_size), args.eval_steps)
                model.train()
                print0(f"step {step:05d} | val loss {val_loss:.4f}")
                log.write(step=step, kind="eval", val_loss=val_loss)
            if last:
                break
            t0 = time.time()
            for _ in range(grad_accum_steps):
                loss = sft_loss(model, x, y)
                (loss / grad_accum_steps).backward()
                x, y, used = next(train_batches)
                if epoch_run:
                    progress = max(progress, used / len(train_set))
                    finished = finished or used >= len(train_set)
            if is_ddp:
                all_reduce_mean([p.grad for p in model.parameters()], world_size)
            lrm = lr_multiplier(progress if epoch_run else step / args.num_iterations,
                                args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac)
            set_lr_multiplier(optimizers, lrm)
            for group in optimizers[1].param_groups:  # Muon (a carried-over state brought the base run's last momentum)
                group["momentum"] = muon_momentum(step, args.momentum_ramp_steps)
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            loss = loss.item()
            dt = time.time() - t0
            step += 1
            head = f"step {step:05d} | {100 * progress:.1f}% of the epoch" if epoch_run else f"step {step:05d}/{args.num_iterations:05d}"
            print0(f"{head} | loss {loss:.4f} | lrm {lrm:.2f} | dt {1000 * dt:.0f}ms")
            log.write(step=step, kind="train", loss=loss, lr_mult=lrm)

        meta_out = dict(step=step, val_loss=val_loss, model_config=config.to_dict(), user_config=user_config,
                        device_batch_size=B, total_batch_size=args.total_batch_size,
                        source=dict(kind=args.source, model_tag=model_tag, step=meta.get("step")), model_tag=model_tag,
                        tokenizer_fingerprint=tokenizer.fingerprint())
        optim_out = dict(optimizers=[opt.state_dict() for opt in optimizers])  # a later run (--source sft) carries it over
        save_checkpoint(checkpoint_dir, step, model.state_dict(), optim_out, meta_out, rank=rank)
        retire_checkpoints(checkpoint_dir, replaced, step, rank)
        print0(f"saved SFT checkpoint to {checkpoint_dir} (val loss {val_loss:.4f})")
        from nanochat.report import get_report
        get_report().log(section="Chat SFT", data=[user_config, {"model_tag": model_tag, "train_conversations": len(train_set),
                                                                  "val_loss": val_loss, "wall_clock_s": round(time.time() - t_start, 1)}])
        log.finish()
    finally:
        compute_cleanup()


if __name__ == "__main__":
    cli_main(main)
