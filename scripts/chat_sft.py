"""
Supervised fine-tuning: turn a base model into a chat model on a mixture of conversations.

    python -m scripts.chat_sft                          # offline mixture (arithmetic, spelling, identity)
    python -m scripts.chat_sft --mixture full           # + SmolTalk, MMLU, GSM8K (downloaded datasets)
    torchrun --standalone --nproc_per_node=8 scripts/chat_sft.py --mixture full

Sizes (depth, sequence length, vocab) come from the base checkpoint. Rows are packed best-fit
with whole conversations and padded with BOS; the loss counts only assistant tokens
(the tokenizer's mask), so padding, user turns and tool outputs are never trained on.
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
    """Infinite (inputs [B, T], targets [B, T]) batches. Each row of T+1 tokens is filled
    best-fit with whole rendered conversations (the largest that fits, from a buffer), then
    padded with BOS; targets are -1 wherever the next token is not an assistant token."""
    bos = tokenizer.get_bos_token_id()
    buffer = []  # [(ids, mask)]
    index = rank

    def refill():
        nonlocal index
        while len(buffer) < buffer_size:
            ids, mask = tokenizer.render_conversation(dataset[index % len(dataset)], max_tokens=T + 1)
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
                refill()
            row += [bos] * (T + 1 - len(row))  # BOS padding, never a target
            row_mask += [0] * (T + 1 - len(row_mask))
            rows.append(row)
            masks.append(row_mask)
        batch = torch.tensor(rows, dtype=torch.long)      # (B, T+1)
        mask = torch.tensor(masks, dtype=torch.bool)      # (B, T+1)
        inputs = batch[:, :-1]
        targets = batch[:, 1:].masked_fill(~mask[:, 1:], -1)
        yield inputs.to(device), targets.to(device)


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
        x, y = next(batches)
        loss = model(x, y, loss_reduction="none")
        sums[0] += loss.sum().double()
        sums[1] += (y >= 0).sum()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    return (sums[0] / sums[1].clamp(min=1)).item()


def main():
    p = argparse.ArgumentParser(description="Supervised fine-tuning of a base model", allow_abbrev=False)
    p.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb)")
    p.add_argument("--device-type", type=str, default="")
    p.add_argument("--source", type=str, default="base", choices=["base", "sft"], help="checkpoints to start from")
    p.add_argument("--model-tag", type=str, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace the SFT checkpoints already under this model tag (else it refuses)")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--mixture", type=str, default="offline", help="offline | full")
    p.add_argument("--device-batch-size", type=int, default=4)
    p.add_argument("--grad-accum-steps", type=int, default=1)
    p.add_argument("--num-iterations", type=int, default=200)
    p.add_argument("--init-lr-frac", type=float, default=0.1, help="learning rates = base defaults x this, decayed linearly to 0")
    p.add_argument("--embedding-lr", type=float, default=0.3)
    p.add_argument("--unembedding-lr", type=float, default=0.008)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--scalar-lr", type=float, default=0.5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps (<= 0: only at the end)")
    p.add_argument("--eval-steps", type=int, default=8)
    args = p.parse_args()
    require_at_least_one(p, args, "device_batch_size", "grad_accum_steps", "num_iterations", "eval_steps")
    if args.init_lr_frac <= 0:
        p.error("--init-lr-frac must be positive")
    user_config = vars(args).copy()

    is_ddp, rank, _, world_size, device = compute_init(args.device_type or autodetect_device_type())
    try:
        _, model_tag, step = resolve_checkpoint(args.source, args.model_tag, args.step)  # the tag loaded names the output
        model, tokenizer, meta = load_model(args.source, device, phase="train", model_tag=model_tag, step=step)
        config = model.config
        T, B = config.sequence_len, args.device_batch_size
        optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr, embedding_lr=args.embedding_lr, matrix_lr=args.matrix_lr,
                                            weight_decay=args.weight_decay, scalar_lr=args.scalar_lr, lr_multiplier=args.init_lr_frac)

        train_set, val_set = build_mixture(args.mixture, "train"), build_mixture(args.mixture, "test")
        print0(f"SFT of {args.source} {model_tag}: {len(train_set):,} train / {len(val_set):,} val conversations, "
               f"{args.num_iterations} steps of {B} x {T} x {args.grad_accum_steps} x {world_size}")
        train_batches = sft_batches(train_set, tokenizer, B, T, device, rank, world_size)
        checkpoint_dir = os.path.join(get_base_dir(), "chatsft_checkpoints", model_tag)
        if rank == 0:
            report_stale_temps(checkpoint_dir)  # what a killed save left (this run is the one writer here)
        replaced = claim_checkpoint_dir(checkpoint_dir, args.overwrite, rank=rank)  # removed once this run has saved
        log = RunLog(os.path.join(checkpoint_dir, "train_log.jsonl"), run=args.run, user_config=user_config, enabled=rank == 0)

        val_loss, t_start = None, time.time()
        for step in range(args.num_iterations + 1):
            last = step == args.num_iterations
            if last or (args.eval_every > 0 and step % args.eval_every == 0):
                model.eval()
                val_loss = evaluate_loss(model, sft_batches(val_set, tokenizer, B, T, device, rank, world_size), args.eval_steps)
                model.train()
                print0(f"step {step:05d} | val loss {val_loss:.4f}")
                log.write(step=step, kind="eval", val_loss=val_loss)
            if last:
                break
            t0 = time.time()
            for _ in range(args.grad_accum_steps):
                x, y = next(train_batches)
                loss = sft_loss(model, x, y)
                (loss / args.grad_accum_steps).backward()
            if is_ddp:
                all_reduce_mean([p.grad for p in model.parameters()], world_size)
            lrm = 1.0 - step / args.num_iterations  # linear decay to 0
            set_lr_multiplier(optimizers, lrm)
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            loss = loss.item()
            dt = time.time() - t0
            print0(f"step {step + 1:05d}/{args.num_iterations:05d} | loss {loss:.4f} | lrm {lrm:.2f} | dt {1000 * dt:.0f}ms")
            log.write(step=step + 1, kind="train", loss=loss, lr_mult=lrm)

        meta_out = dict(step=args.num_iterations, val_loss=val_loss, model_config=config.to_dict(), user_config=user_config,
                        source=dict(kind=args.source, model_tag=model_tag, step=meta.get("step")), model_tag=model_tag,
                        tokenizer_fingerprint=tokenizer.fingerprint())
        save_checkpoint(checkpoint_dir, args.num_iterations, model.state_dict(), None, meta_out, rank=rank)
        retire_checkpoints(checkpoint_dir, replaced, args.num_iterations, rank)
        print0(f"saved SFT checkpoint to {checkpoint_dir} (val loss {val_loss:.4f})")
        from nanochat.report import get_report
        get_report().log(section="Chat SFT", data=[user_config, {"model_tag": model_tag, "train_conversations": len(train_set),
                                                                  "val_loss": val_loss, "wall_clock_s": round(time.time() - t_start, 1)}])
        log.finish()
    finally:
        compute_cleanup()


if __name__ == "__main__":
    cli_main(main)
