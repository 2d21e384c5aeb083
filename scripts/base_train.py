"""
Pretrain the base model.

    python -m scripts.base_train --depth 12                          # one process (cuda, mps or cpu)
    torchrun --nproc_per_node=8 scripts/base_train.py --depth 20     # one node, DDP
    python -m scripts.base_train --config configs/cpu_tiny.toml      # a TOML preset; flags override it

The model is sized from --depth; the token budget, batch size, learning rates and weight
decay follow from it (see "Sizing" in shared/spec/nanochat-baseline.md) unless overridden.
"""

import os
import sys
import math
import json
import time
import signal
import argparse
import difflib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from nanochat.common import (UserError, cli_main, compute_init, compute_cleanup, get_base_dir, print0,
                             autodetect_device_type, compute_dtype, all_reduce_mean, report_stale_temps, synchronize, usable_cpus)
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import get_tokenizer, get_token_bytes
from nanochat.dataloader import bos_bestfit_loader
from nanochat.recall import recall_loader, recall_eval_docs, recall_accuracy
from nanochat.checkpoint_manager import (MAX_SIZES, checkpoint_steps, claim_checkpoint_dir, retire_checkpoints, save_checkpoint, unmark_step,
                                         load_checkpoint, prepare_state_dict)
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import load_optimizer_state, set_lr_multiplier
from nanochat.dataset import get_data_dir
from nanochat.runlog import RunLog, peak_flops

B_REF = 2 ** 19  # the reference total batch size (tokens) that the default learning rates are tuned for


def build_parser():
    p = argparse.ArgumentParser(description="Pretrain the base model", allow_abbrev=False)
    p.add_argument("--config", type=str, default="", help="TOML preset whose keys set the defaults of the flags below")
    p.add_argument("--run", type=str, default="dummy", help="wandb run name ('dummy' disables wandb)")
    p.add_argument("--device-type", type=str, default="", help="cuda|mps|cpu (empty: autodetect)")
    # model
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--aspect-ratio", type=int, default=64, help="model_dim = depth * aspect_ratio, rounded up to head_dim")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--window-pattern", type=str, default="SSSL")
    # training horizon (first one set wins: iterations, flops, data:param ratio)
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: from --target-flops, else --target-param-data-ratio)")
    p.add_argument("--target-flops", type=float, default=-1.0)
    p.add_argument("--target-param-data-ratio", type=float, default=12.0)
    # batch
    p.add_argument("--device-batch-size", type=int, default=32)
    p.add_argument("--total-batch-size", type=int, default=-1, help="tokens per step (-1: derived from depth)")
    # data
    p.add_argument("--long-range-frac", type=float, default=0.0,
                   help="synthetic long-range documents (passkey, key-value recall, variable use) per real document (nanochat/longrange.py)")
    p.add_argument("--long-range-tokens", type=int, default=-1, help="tokens per synthetic document, BOS included, at most max_seq_len + 1 (-1: a full row)")
    p.add_argument("--recall-facts", type=int, default=0, help="> 0: dense recall rows, this many facts and questions each, "
                   "loss on the answers only (nanochat/recall.py; the recall testbed, configs/cpu_recall.toml)")
    p.add_argument("--recall-short-len", type=int, default=256, help="recall curriculum: rows of this many tokens first")
    p.add_argument("--recall-short-steps", type=int, default=0, help="recall curriculum: steps of short rows")
    p.add_argument("--recall-eval-docs", type=int, default=32, help="recall rows (one fact) scored at each eval: full attention, "
                   "the newest --recall-window tokens, and the MegaContext WC")
    p.add_argument("--recall-window", type=int, default=128, help="the truncation baseline's window (a MegaContext run: mc_w_max)")
    # optimization
    p.add_argument("--embedding-lr", type=float, default=0.3)
    p.add_argument("--unembedding-lr", type=float, default=0.008)
    p.add_argument("--matrix-lr", type=float, default=0.02)
    p.add_argument("--scalar-lr", type=float, default=0.5)
    p.add_argument("--smear-lr", type=float, default=0.2, help="Adam rate of the smear gate and the smear and backout "
                   "lambdas: upstream's 0.2, as given (not batch-scaled like the rates above)")
    p.add_argument("--weight-decay", type=float, default=0.28)
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--warmdown-ratio", type=float, default=0.65)
    p.add_argument("--final-lr-frac", type=float, default=0.05)
    # evaluation / output
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-tokens", type=int, default=20 * 524288)
    p.add_argument("--core-metric-every", type=int, default=2000, help="-1 disables")
    p.add_argument("--core-metric-max-per-task", type=int, default=500)
    p.add_argument("--sample-every", type=int, default=2000, help="-1 disables (samples are always printed at the end)")
    p.add_argument("--save-every", type=int, default=-1, help="-1: only at the end")
    p.add_argument("--resume-from-step", type=int, default=-1)
    p.add_argument("--overwrite", action="store_true", help="a fresh run replaces the checkpoints already under --model-tag (else it refuses)")
    p.add_argument("--seed", type=int, default=0, help="another draw of the initial weights, the recall rows and the "
                   "MegaContext slates (0: the default draw; the pretraining shards' order is fixed)")
    p.add_argument("--model-tag", type=str, default=None, help="checkpoint dir name (default d<depth>, "
                   "d<depth>_mc for a --megacontext run, so that it never lands on its vanilla twin's)")
    p.add_argument("--compile", type=int, default=-1, help="torch.compile the model (1/0; -1: on cuda only)")
    p.add_argument("--megacontext", action="store_true", help="MegaContext run: adds the --mc-* settings (see nanochat/megacontext/config.py)")
    p.add_argument("--megaprediction", action="store_true", help="with --megacontext: train MegaPrediction readouts (= --mc-megaprediction true)")
    p.add_argument("--cognitive-core", action="store_true", help="with --megacontext: train with each history split into a "
                   "Core-Knowledge memory and a session, the CK reliance margin loss (= --mc-cognitive-core true)")
    return p


def check_preset(parser, preset, path):
    """Each preset value must be of its flag's type (argparse takes a default as it is, unconverted):
    true/false for a switch (store_true, or the mc_* switches' true/false type), else an integer, a
    finite number or a string, one of the flag's choices if it has them."""
    actions = {a.dest: a for a in parser._actions}
    for key, value in preset.items():
        action = actions[key]
        kind = bool if action.nargs == 0 or action.type not in (None, int, float, str) else (action.type or str)
        ok = {bool: type(value) is bool, int: type(value) is int, str: isinstance(value, str),
              float: type(value) in (int, float) and math.isfinite(float(value))}[kind]
        if not ok or (action.choices is not None and value not in action.choices):
            want = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}[kind]
            choices = f" (one of {', '.join(map(str, action.choices))})" if action.choices else ""
            raise UserError(f"{path}: {key} must be {want}{choices}, got {value!r}")


def parse_args(argv=None):
    """Flags, with defaults taken from --config's TOML preset when given."""
    import tomllib
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    preset = {}
    if pre.config:
        try:
            with open(pre.config, "rb") as f:
                preset = tomllib.load(f)
        except FileNotFoundError:
            raise UserError(f"config file not found: {pre.config}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"bad TOML in {pre.config}: {e}") from None
        except OSError as e:
            raise UserError(f"cannot read config {pre.config}: {e.strerror or e}") from None
        twice = sorted({k.replace("-", "_") for k in preset if k.replace("-", "_") != k and k.replace("-", "_") in preset})
        if twice:  # max-seq-len and max_seq_len: one would silently win
            raise UserError(f"{pre.config}: {twice[0]} is given twice (once with dashes)")
        preset = {k.replace("-", "_"): v for k, v in preset.items()}
    if type(preset.get("megacontext", False)) is not bool:
        raise UserError(f"{pre.config}: megacontext must be true or false, got {preset['megacontext']!r}")
    if pre.megacontext or preset.get("megacontext"):  # only MegaContext runs import the package
        from nanochat.megacontext.config import add_args
        add_args(parser)
    if preset:
        known = {a.dest for a in parser._actions} - {"help", "config"}  # a preset cannot include another or ask for help
        unknown = sorted(set(preset) - known)
        if unknown:
            mc_off = not preset.get("megacontext") and any(k.startswith("mc_") for k in unknown)
            close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            hint = " (mc_* keys need megacontext = true)" if mc_off else f" (did you mean {close[0]}?)" if close else ""
            raise UserError(f"{pre.config}: unknown key(s) {', '.join(unknown)}{hint}")
        check_preset(parser, preset, pre.config)
        parser.set_defaults(**preset)
    args = parser.parse_args(argv)
    for a in parser._actions:  # the trunk's numbers, from flags or a preset (MegaContextConfig.validate checks the mc_* ones)
        if a.type is float and not a.dest.startswith("mc_") and not math.isfinite(getattr(args, a.dest)):
            raise UserError(f"--{a.dest.replace('_', '-')} must be a finite number, got {getattr(args, a.dest)}")
    for name in ("embedding_lr", "unembedding_lr", "matrix_lr", "scalar_lr", "smear_lr", "weight_decay", "final_lr_frac"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if not 0 <= args.warmdown_ratio <= 1:
        raise UserError(f"--warmdown-ratio must be in [0, 1], got {args.warmdown_ratio}")
    if args.megaprediction:
        if not args.megacontext:
            raise UserError("--megaprediction needs --megacontext (its readouts predict GistNet's gists)")
        args.mc_megaprediction = True
    if args.cognitive_core:
        if not args.megacontext:
            raise UserError("--cognitive-core needs --megacontext (its memories are MegaContexts)")
        args.mc_cognitive_core = True
    return args


def checkpoint_tag(args):
    """--model-tag, else upstream's d<depth>; a MegaContext run d<depth>_mc, beside (not over) its vanilla twin."""
    return args.model_tag or f"d{args.depth}" + ("_mc" if args.megacontext else "")


def model_config_from_args(args, vocab_size):
    if args.depth < 1 or args.aspect_ratio < 1 or args.head_dim < 2 or args.head_dim % 2:
        raise UserError(f"impossible model size: depth {args.depth}, aspect ratio {args.aspect_ratio}, head dim {args.head_dim}")
    if args.max_seq_len < 2:
        raise UserError(f"--max-seq-len must be at least 2, got {args.max_seq_len}")
    if not args.window_pattern or set(args.window_pattern.upper()) - {"S", "L"}:
        raise UserError(f"--window-pattern must be made of S and L, got {args.window_pattern!r}")
    n_embd = math.ceil(args.depth * args.aspect_ratio / args.head_dim) * args.head_dim
    n_head = n_embd // args.head_dim
    for what, value, key in [("--depth", args.depth, "n_layer"), ("--max-seq-len", args.max_seq_len, "sequence_len"),
                             ("the model width (depth x aspect ratio)", n_embd, "n_embd")]:
        if value > MAX_SIZES[key]:
            raise UserError(f"{what} {value:,} is above {MAX_SIZES[key]:,}")
    return GPTConfig(sequence_len=args.max_seq_len, vocab_size=vocab_size, n_layer=args.depth,
                     n_head=n_head, n_kv_head=n_head, n_embd=n_embd, window_pattern=args.window_pattern.upper())


def scaling_params(config):
    with torch.device("meta"):
        return GPT(config).num_scaling_params()


def get_lr_multiplier(it, num_iterations, warmup_steps, warmdown_ratio, final_lr_frac):
    """Linear warmup, constant, then linear warmdown to final_lr_frac over the last warmdown_ratio."""
    warmdown_steps = round(warmdown_ratio * num_iterations)
    if it < warmup_steps:
        return (it + 1) / warmup_steps
    if it <= num_iterations - warmdown_steps:
        return 1.0
    progress = (num_iterations - it) / warmdown_steps  # 1 -> 0 through the warmdown
    return progress + (1 - progress) * final_lr_frac


def get_muon_momentum(it, num_iterations, warmdown_ratio):
    """0.85 -> 0.97 over the first 400 steps, then 0.97, back toward 0.90 through a warmdown that starts
    after those 400 steps; as upstream, the warmup wins: a run shorter than that (every CPU preset) warms up
    through its warmdown and never turns back."""
    if it < 400:
        return 0.85 + (0.97 - 0.85) * it / 400
    warmdown_steps = round(warmdown_ratio * num_iterations)
    if warmdown_steps > 0 and it >= num_iterations - warmdown_steps:
        progress = (it - (num_iterations - warmdown_steps)) / warmdown_steps
        return 0.97 * (1 - progress) + 0.90 * progress
    return 0.97


def get_muon_weight_decay(it, num_iterations, weight_decay):
    """Cosine decay of Muon's weight decay to 0 at the end of training."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * it / max(num_iterations, 1)))


def print_samples(model, tokenizer, prompts, max_tokens=32):
    bos = tokenizer.get_bos_token_id()
    for prompt in prompts:
        ids = list(model.generate(tokenizer.encode(prompt, prepend=bos), max_tokens, temperature=0))
        print0(f"  {prompt!r} -> {tokenizer.decode(ids)!r}")


SAMPLE_PROMPTS = ["The capital of France is", "def fibonacci(n):", "import os\n", "If yesterday was Friday, then tomorrow will be"]


def recall_metrics(model, docs, trainer, window, device):
    """Exact recall of docs (recall_eval_docs) -> {"recall/full", "recall/truncation"[, "recall/megacontext"]}:
    a vanilla run reads the whole history or its newest `window` tokens, a MegaContext run
    MegaContextTrainer.recall: the same two, plus its refocused WC."""
    model.eval()
    if trainer is None:
        out = {"recall/full": recall_accuracy(model, docs, device=device),
               "recall/truncation": recall_accuracy(model, docs, window, device=device)}
    else:
        out = trainer.recall(docs, device)
    model.train()
    return out


def main(argv=None):
    try:
        return train(argv)
    finally:
        compute_cleanup()


def check_megacontext_run(mc, history):
    """Settings under which a MegaContext run would train nothing of what it adds, refused in one line."""
    from nanochat.megacontext import BLOCK_SIZE
    from nanochat.megacontext.working_context import HistoryShape, WorkingContext
    if history <= mc.w_max:
        raise UserError(f"--megacontext: the history (max_seq_len + 1 - mc_horizon = {history} tokens) "
                        f"must be longer than mc_w_max ({mc.w_max}), or there is nothing to compress")
    coarsest = WorkingContext.coarsest(HistoryShape(history), mc.recent_tokens, mc.max_level).cost
    if coarsest > mc.w_max:  # no reference WC fits once C2 reaches w_max: GistNet and LensNet would stop learning there
        raise UserError(f"--megacontext: a {history}-token history costs {coarsest} slots at its coarsest (gists up to LOD{mc.max_level} "
                        f"and {mc.recent_tokens} recent tokens), more than mc_w_max {mc.w_max}: raise mc_max_level or mc_w_max, "
                        "or shorten max_seq_len")
    if mc.num_variants < 3 and mc.lens_weight > 0:
        raise UserError(f"mc_num_variants {mc.num_variants}: LensNet learns from a slate's edited variants (baseline, reference, "
                        "then the edits), so it needs at least 3 (or mc_lens_weight 0)")
    if mc.alpha_lod2 > 0 and mc.max_level >= 2 and mc.horizon < BLOCK_SIZE ** 2:
        raise UserError(f"mc_alpha_lod2 {mc.alpha_lod2} trains nothing: a LOD2 gist spans {BLOCK_SIZE ** 2} tokens, more than "
                        f"mc_horizon {mc.horizon} (set it to 0, or mc_horizon >= {BLOCK_SIZE ** 2})")


def train(argv=None):
    args = parse_args(argv)
    mc = None
    if args.megacontext:  # the one switch: everything MegaContext below hangs off `mc`
        from nanochat.megacontext.config import from_args
        mc = from_args(args)
        check_megacontext_run(mc, args.max_seq_len + 1 - mc.horizon)
    if args.seed < 0:
        raise UserError(f"--seed must be 0 or more, got {args.seed}")
    if args.num_iterations == 0 or args.num_iterations < -1:
        raise UserError(f"--num-iterations must be at least 1 (or -1: derived), got {args.num_iterations}")
    user_config = vars(args).copy()
    device_type = args.device_type or autodetect_device_type()
    is_ddp, rank, local_rank, world_size, device = compute_init(device_type)
    if args.seed:  # 0 keeps compute_init's torch seed, so a run without --seed is the run it always was
        torch.manual_seed(42 + args.seed)
    master = rank == 0
    # SIGUSR1 on a CPU: train on every core this process may use from the next step (the CPU job sends it to the
    # recall testbed, trained on half the cores, once the stages beside it are done). The handler only notes it.
    more_threads = []
    if device_type == "cpu" and hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, lambda *_: more_threads.append(True))

    # tokenizer and model -------------------------------------------------------------
    tokenizer = get_tokenizer()
    token_bytes = get_token_bytes(device=device, tokenizer=tokenizer)
    vocab_size = tokenizer.get_vocab_size()
    config = model_config_from_args(args, vocab_size)
    print0(f"model config: {json.dumps(config.to_dict())}")

    # sizing: tokens, batch, iterations, learning-rate and weight-decay scaling -----------
    if args.target_param_data_ratio <= 0:
        raise UserError(f"--target-param-data-ratio must be positive, got {args.target_param_data_ratio}")
    num_params = scaling_params(config)
    ref_config = model_config_from_args(argparse.Namespace(**{**vars(args), "depth": 12}), vocab_size)
    data_tokens = args.target_param_data_ratio * num_params               # D
    ref_tokens = args.target_param_data_ratio * scaling_params(ref_config)  # D_ref
    total_batch_size = args.total_batch_size
    if total_batch_size == -1:
        total_batch_size = 2 ** round(math.log2(B_REF * (data_tokens / ref_tokens) ** 0.383))
    tokens_per_fwdbwd = args.device_batch_size * args.max_seq_len * world_size
    if args.device_batch_size < 1 or total_batch_size < tokens_per_fwdbwd or total_batch_size % tokens_per_fwdbwd:
        raise UserError(f"impossible sizes: total batch {total_batch_size} tokens is not a positive multiple of "
                        f"device batch {args.device_batch_size} x seq len {args.max_seq_len} x {world_size} ranks = {tokens_per_fwdbwd}")
    grad_accum_steps = total_batch_size // tokens_per_fwdbwd
    lr_scale = (total_batch_size / B_REF) ** 0.5
    weight_decay = args.weight_decay * lr_scale * ref_tokens / data_tokens

    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    flops_per_token = model.estimate_flops()
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    elif args.target_flops > 0:
        num_iterations = round(args.target_flops / (flops_per_token * total_batch_size))
    else:
        num_iterations = int(data_tokens // total_batch_size)
    if num_iterations < 1:
        raise UserError(f"impossible sizes: the run would have {num_iterations} iterations")
    print0(f"params (scaling): {num_params:,} | flops/token: {flops_per_token:.3e} | total batch: {total_batch_size:,} tokens "
           f"| grad accum: {grad_accum_steps} | iterations: {num_iterations:,} | tokens: {num_iterations * total_batch_size:,} "
           f"| lr scale: {lr_scale:.3f} | weight decay: {weight_decay:.4f}")

    optimizers = model.setup_optimizers(unembedding_lr=args.unembedding_lr * lr_scale, embedding_lr=args.embedding_lr * lr_scale,
                                        matrix_lr=args.matrix_lr * lr_scale, weight_decay=weight_decay, scalar_lr=args.scalar_lr * lr_scale,
                                        smear_lr=args.smear_lr)
    adamw, muon = optimizers
    trainer = None
    if mc is not None:  # GistNet + LensNet (+ MegaPredictor) and their AdamW, scheduled with the model's optimizers
        from nanochat.megacontext.training import MegaContextTrainer
        trainer = MegaContextTrainer.build(model, mc, device, bos_id=tokenizer.get_bos_token_id(), seed=args.seed)
        mc_optimizer = trainer.make_optimizer()
        for line in trainer.describe(history=args.max_seq_len + 1 - mc.horizon):
            print0(line)

    # checkpoint dir and resume -----------------------------------------------------------
    model_tag = checkpoint_tag(args)
    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", model_tag)
    if master:
        report_stale_temps(checkpoint_dir)  # what a killed save left (this run is the one writer here)
    # the steps this run replaces, removed after its first save: an earlier run's (--overwrite), or when resumed the
    # abandoned steps past the start (left, the last of them would stay the step every loader picks)
    if args.resume_from_step < 0:
        replaced = claim_checkpoint_dir(checkpoint_dir, args.overwrite, rank=rank, resumable=True)
    else:
        replaced = checkpoint_steps(checkpoint_dir, after=args.resume_from_step)
    start_step, loader_state = 0, None
    loop_state = dict(min_val_bpb=float("inf"), smooth_train_loss=0.0, total_training_time=0.0, flops_seen=0.0)
    if args.resume_from_step >= 0:
        model_data, optim_data, meta = load_checkpoint(checkpoint_dir, args.resume_from_step, device, load_optimizer=True, rank=rank)
        missing = [k for k in ("model_config", "step", "loop_state") if k not in meta]
        # the loader's position: this rank's, saved with its optimizer; upstream keeps rank 0's in the meta alone
        loader_state = optim_data.get("dataloader_state_dict") if isinstance(optim_data, dict) else None
        loader_state = meta.get("dataloader_state_dict") if loader_state is None else loader_state
        missing += ["optimizers"] if not isinstance(optim_data, dict) or "optimizers" not in optim_data else []
        missing += ["dataloader_state_dict"] if loader_state is None else []
        if missing:
            raise UserError(f"cannot resume from step {args.resume_from_step} in {checkpoint_dir}: checkpoint lacks {', '.join(missing)}")
        saved = meta.get("user_config")
        saved_seed = saved.get("seed", 0) if isinstance(saved, dict) else 0
        if saved_seed != args.seed:
            raise UserError(f"cannot resume from step {args.resume_from_step} in {checkpoint_dir}: it was trained with --seed "
                            f"{saved_seed}, this run has --seed {args.seed}")
        if ("megacontext" in meta) != (mc is not None):  # resumed the other way, its MegaContext weights would be dropped or made up
            kind = "a MegaContext run: resume it with its --megacontext settings (its preset)" if "megacontext" in meta else "a vanilla run"
            raise UserError(f"cannot resume from step {args.resume_from_step} in {checkpoint_dir}: it is {kind}, "
                            f"this run is {'MegaContext' if mc is not None else 'vanilla'}")
        if meta["model_config"] != config.to_dict():
            raise UserError(f"cannot resume: checkpoint model_config {meta['model_config']} differs from this run's {config.to_dict()}")
        try:
            model.load_state_dict(prepare_state_dict(model_data, device), strict=True)
        except RuntimeError as e:  # missing / unexpected keys, shapes of another model
            raise UserError(f"cannot resume from step {args.resume_from_step} in {checkpoint_dir}: its model file does not fit "
                            f"this model ({str(e).splitlines()[1 if len(str(e).splitlines()) > 1 else 0].strip()[:160]})") from None
        optim_path = os.path.join(checkpoint_dir, f"optim_{args.resume_from_step:06d}_rank{rank:d}.pt")
        states = optim_data["optimizers"]
        if not isinstance(states, list) or len(states) != len(optimizers):
            raise UserError(f"cannot resume the optimizer from {optim_path}: {len(states) if isinstance(states, list) else 'no list of'} "
                            f"optimizer states for this run's {len(optimizers)} optimizers")
        for opt, state in zip(optimizers, states):
            load_optimizer_state(opt, state, optim_path)
        saved_loop = meta["loop_state"] if isinstance(meta["loop_state"], dict) else {}
        required = ("min_val_bpb", "smooth_train_loss", "total_training_time")
        optional = ("flops_seen", "min_smooth_loss", "min_smooth_step")  # later builds' numbers: older checkpoints lack them
        if type(meta["step"]) is not int or not all(type(saved_loop.get(k)) in (int, float) for k in required) or not all(
                type(saved_loop[k]) in (int, float) for k in optional if k in saved_loop):
            raise UserError(f"cannot resume from step {args.resume_from_step} in {checkpoint_dir}: its meta's step / loop_state is damaged")
        start_step = meta["step"]
        if trainer is not None:
            trainer.resume(checkpoint_dir, start_step, mc_optimizer)
        if start_step > num_iterations:
            raise UserError(f"cannot resume from step {start_step}: this run has only {num_iterations} iterations")
        loop_state = saved_loop
        loop_state.setdefault("flops_seen", start_step * total_batch_size * flops_per_token)  # older checkpoints
        print0(f"resumed from step {start_step} in {checkpoint_dir}")
        del model_data, optim_data

    orig_model = model  # uncompiled, for saving and sampling
    use_compile = args.compile == 1 or (args.compile == -1 and device_type == "cuda")
    if use_compile:
        model = torch.compile(model, dynamic=False)
        if trainer is not None:
            trainer.compile()  # the MegaContext variant forward too

    # data ---------------------------------------------------------------------------------
    T, B = args.max_seq_len, args.device_batch_size
    if args.recall_facts > 0:  # the recall testbed: dense recall rows, answer-only targets
        if args.recall_window < 1:
            raise UserError(f"--recall-window must be at least 1 token, got {args.recall_window}")
        train_loader = recall_loader(tokenizer, B, T, "train", args.recall_facts, device=device, resume_state_dict=loader_state,
                                     short_len=args.recall_short_len, short_batches=args.recall_short_steps * grad_accum_steps,
                                     seed=args.seed)
        recall_docs = recall_eval_docs(tokenizer, T + 1, args.recall_eval_docs)
    else:
        train_loader = bos_bestfit_loader(tokenizer, B, T, "train", device=device, resume_state_dict=loader_state,
                                          long_range_frac=args.long_range_frac,
                                          long_range_tokens=None if args.long_range_tokens == -1 else args.long_range_tokens)
    x, y, next_loader_state = next(train_loader)  # always one batch ahead, so packing overlaps GPU work
    eval_steps = max(1, args.eval_tokens // (B * T * world_size))

    if args.core_metric_every > 0:  # fetch and read the CORE bundle now, not hours into the run
        from nanochat.core_eval import get_eval_bundle, load_bundle_tasks, evaluate_core
        core_tasks = load_bundle_tasks(get_eval_bundle())

    log = RunLog(os.path.join(checkpoint_dir, "train_log.jsonl"), run=args.run, user_config=user_config, enabled=master,
                 resume_step=start_step if args.resume_from_step >= 0 else None, fresh=args.resume_from_step < 0)
    peak = peak_flops(device)
    dtype = compute_dtype(device_type)
    print0(f"device: {device} | dtype: {dtype} | world size: {world_size} | data: {get_data_dir()} | compile: {use_compile}")

    def checkpoint(step, val_bpb):
        meta = dict(step=step, val_bpb=val_bpb, model_config=config.to_dict(), user_config=user_config, tokenizer_fingerprint=tokenizer.fingerprint(),
                    device_batch_size=B, max_seq_len=T, total_batch_size=total_batch_size,
                    dataloader_state_dict=loader_state, loop_state=loop_state, dataset=os.path.basename(get_data_dir()))
        optim_data = dict(optimizers=[opt.state_dict() for opt in optimizers], dataloader_state_dict=loader_state)
        if mc is not None:  # beside the model, before the meta (the meta, written last, marks a complete step)
            meta["megacontext"] = mc.to_dict()
            if master:
                unmark_step(checkpoint_dir, step)  # the MegaContext file comes first: an old meta of the step goes before it
                trainer.save(checkpoint_dir, step, mc_optimizer)
        save_checkpoint(checkpoint_dir, step, orig_model.state_dict(), optim_data, meta, rank=rank)
        print0(f"saved checkpoint step {step} to {checkpoint_dir}")
        nonlocal replaced
        replaced = retire_checkpoints(checkpoint_dir, replaced, step, rank)

    # training loop ----------------------------------------------------------------------------
    val_bpb = None
    step = start_step
    while True:
        last_step = step == num_iterations
        if args.eval_every > 0 and (step % args.eval_every == 0 or last_step):
            model.eval()
            val_loader = bos_bestfit_loader(tokenizer, B, T, "val", device=device)
            val_bpb = evaluate_bpb(model, val_loader, eval_steps, token_bytes)
            loop_state["min_val_bpb"] = min(loop_state["min_val_bpb"], val_bpb)
            print0(f"step {step:05d} | val bpb {val_bpb:.4f}")
            mc_val = {}
            if mc is not None and mc.eval_rows > 0:  # failure mode 10: validate the MegaContext path too
                mc_val, line = trainer.validate(tokenizer, B, T, device)
                print0(f"step {step:05d} | {line}")
            recall = {}
            if args.recall_facts > 0:  # recall of one fact anywhere in a T-token row: full attention, truncation, the WC (rank 0's view)
                recall = recall_metrics(orig_model, recall_docs, trainer, args.recall_window, device)
                print0(f"step {step:05d} | recall " + " | ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in recall.items()))
            log.write(step=step, kind="eval", val_bpb=val_bpb, **recall, tokens_seen=step * total_batch_size, flops_seen=loop_state["flops_seen"],
                      wall_s=loop_state["total_training_time"], **mc_val)
            model.train()
        if step > start_step and last_step:  # saved before CORE and the samples: nothing after the last step can lose the run
            checkpoint(step, val_bpb)
        if args.core_metric_every > 0 and step > start_step and (step % args.core_metric_every == 0 or last_step):
            model.eval()
            core = evaluate_core(orig_model, tokenizer, device, max_per_task=args.core_metric_max_per_task, tasks=core_tasks)
            print0(f"step {step:05d} | CORE {core['core_metric']:.4f}")
            log.write(step=step, kind="core", core_metric=core["core_metric"], **{f"core/{k}": v for k, v in core["centered_results"].items()})
            model.train()
        if master and (last_step or (args.sample_every > 0 and step > start_step and step % args.sample_every == 0)):
            print0(f"step {step:05d} | samples:")
            orig_model.eval()
            print_samples(orig_model, tokenizer, SAMPLE_PROMPTS)
            orig_model.train()
        if step > start_step and not last_step and args.save_every > 0 and step % args.save_every == 0:
            checkpoint(step, val_bpb)
        if last_step:
            break

        if more_threads:
            more_threads.clear()
            torch.set_num_threads(usable_cpus())
            print0(f"step {step:05d}: SIGUSR1, training on {torch.get_num_threads()} threads from here")

        # one optimization step: grad_accum_steps micro-batches, then all-reduce and update
        t0 = time.time()  # the previous step ended in a sync (or an eval's .item())
        step_flops = flops_per_token * total_batch_size
        mc_stats = []
        for micro in range(grad_accum_steps):
            if trainer is None:  # recall rows score only their answers: the head runs there alone
                loss = model(x, y, scored_only=args.recall_facts > 0)
                train_loss = loss.detach()
                (loss / grad_accum_steps).backward()
            else:  # the LM loss (+ MegaPrediction's), then the MegaContext losses on the same rows
                train_loss, stats, flops = trainer.micro_step(model, x, y, step, num_iterations, grad_accum_steps,
                                                              stream=rank * grad_accum_steps + micro, scored_only=args.recall_facts > 0)
                step_flops += world_size * flops
                mc_stats.append(stats)
            loader_state = next_loader_state  # the state after the batch just consumed: what a checkpoint resumes from
            x, y, next_loader_state = next(train_loader)
        params = list(orig_model.parameters()) + ([] if trainer is None else trainer.parameters())
        if is_ddp:
            for p in params:  # a MegaContext module can sit out a rank's step (e.g. LensNet while C2 covers every history)
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            all_reduce_mean([p.grad for p in params], world_size)
        lrm = get_lr_multiplier(step, num_iterations, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
        step_optimizers = optimizers if mc is None else optimizers + [mc_optimizer]
        set_lr_multiplier(step_optimizers, lrm)
        for group in muon.param_groups:
            group["momentum"] = get_muon_momentum(step, num_iterations, args.warmdown_ratio)
            group["weight_decay"] = get_muon_weight_decay(step, num_iterations, weight_decay)
        for opt in step_optimizers:
            opt.step()
        for p in params:
            p.grad = None
        train_loss = train_loss.item()
        synchronize(device)
        dt = time.time() - t0
        finite = torch.tensor(float(math.isfinite(train_loss)), device=device)
        if is_ddp:  # every rank stops at the same step (a rank left alone would wait in the next all-reduce)
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not finite.item():  # diverged: it trained on to a NaN model, saved it and reported step 0's val bpb
            raise UserError(f"step {step + 1}: the training loss is no longer finite, the run diverged: lower the learning "
                            "rates and train again (the checkpoints saved before this step are kept)")

        step += 1
        beta = 0.9  # EMA of the training loss, debiased
        loop_state["smooth_train_loss"] = beta * loop_state["smooth_train_loss"] + (1 - beta) * train_loss
        smooth = loop_state["smooth_train_loss"] / (1 - beta ** step)
        if step > args.warmup_steps and smooth < loop_state.get("min_smooth_loss", math.inf):  # to tell a spike it never recovered from
            loop_state.update(min_smooth_loss=smooth, min_smooth_step=step)
        if step > start_step + 10 or num_iterations - start_step <= 10:  # skip the compile/warmup steps in the clock
            loop_state["total_training_time"] += dt
        loop_state["flops_seen"] += step_flops
        tok_per_sec = total_batch_size / dt  # raw data tokens per second, the same measure for vanilla and MegaContext
        mfu = step_flops / dt / (peak * world_size) if peak else None
        done = step / num_iterations  # of the whole run, as upstream (a resumed run printed its own share)
        eta = dt * (num_iterations - step)
        mfu_str = f"{100 * mfu:.1f}%" if mfu is not None else "n/a"
        mc_metrics, mc_line = ({}, "") if trainer is None else trainer.summarize(mc_stats)  # micro-batch means
        print0(f"step {step:05d}/{num_iterations:05d} ({100 * done:.1f}%) | loss {smooth:.4f} | lrm {lrm:.2f} | dt {1000 * dt:.0f}ms "
               f"| tok/s {tok_per_sec:,.0f} | mfu {mfu_str}{mc_line} | eta {eta / 60:.1f}m")
        log.write(step=step, kind="train", loss=train_loss, smooth_loss=smooth, lr_mult=lrm, tok_per_sec=tok_per_sec, mfu=mfu,
                  tokens_seen=step * total_batch_size, flops_seen=loop_state["flops_seen"],
                  wall_s=loop_state["total_training_time"], **mc_metrics)

    print0(f"done: min val bpb {loop_state['min_val_bpb']:.4f} | training time {loop_state['total_training_time'] / 60:.2f}m")
    spike = None  # a finite divergence: the smoothed loss ends more than double its low and a nat above it
    low = loop_state.get("min_smooth_loss", math.inf)
    if num_iterations > start_step and smooth - low > max(1.0, low):
        spike = (f"the training loss spiked and never recovered: {smooth:.3f} at the end against {low:.3f} at step "
                 f"{loop_state['min_smooth_step']}; the saved model is far worse than the run's best (try another --seed or lower rates)")
        print0(f"warning: {spike}")
    from nanochat.report import get_report
    # the recall testbed is a second model beside the pipeline's: its own section, kept out of the summary table
    section = "Recall testbed training" if args.recall_facts > 0 else "Base model training"
    get_report().log(section=section, data=[user_config, {
        "model_tag": model_tag, "parameters (scaling)": num_params, "flops_per_token": f"{flops_per_token:.3e}",
        "iterations": num_iterations, "tokens": num_iterations * total_batch_size, "total_batch_size": total_batch_size,
        "val_bpb": val_bpb, "min_val_bpb": loop_state["min_val_bpb"], "wall_clock_s": round(loop_state["total_training_time"], 1),
        **({"warning": spike} if spike else {})}])
    log.finish()
    return dict(final_loss=train_loss if num_iterations > start_step else None, val_bpb=val_bpb, spike=spike)


if __name__ == "__main__":
    cli_main(main)
