import os
import sys
import copy
import json
import math
import signal
import subprocess

import pytest
import torch

from conftest import save_without_digest
from nanochat.common import UserError
from nanochat.checkpoint_manager import find_last_step
from scripts import base_train
from scripts.base_train import get_lr_multiplier, get_muon_momentum, get_muon_weight_decay

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--depth", "2", "--aspect-ratio", "64", "--head-dim", "64", "--max-seq-len", "64", "--window-pattern", "SL",
        "--device-batch-size", "2", "--total-batch-size", "256", "--eval-tokens", "256", "--core-metric-every", "-1",
        "--sample-every", "-1", "--warmup-steps", "2", "--device-type", "cpu"]


def run_script(args, base, extra_env=None):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "WANDB_MODE": "disabled", **(extra_env or {})}
    env.pop("NANOCHAT_DATASET", None)
    return subprocess.run([sys.executable, "-m", "scripts.base_train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_lr_schedule_warmup_constant_warmdown():
    n = 100
    assert get_lr_multiplier(0, n, 10, 0.65, 0.05) == pytest.approx(0.1)
    assert get_lr_multiplier(9, n, 10, 0.65, 0.05) == pytest.approx(1.0)
    assert get_lr_multiplier(35, n, 10, 0.65, 0.05) == 1.0
    assert get_lr_multiplier(100, n, 10, 0.65, 0.05) == pytest.approx(0.05)
    mid = get_lr_multiplier(35 + 65 // 2, n, 10, 0.65, 0.05)
    assert 0.05 < mid < 1.0


def test_muon_momentum_and_weight_decay_schedules():
    assert get_muon_momentum(0, 10000, 0.65) == pytest.approx(0.85)
    assert get_muon_momentum(400, 10000, 0.65) == pytest.approx(0.97)
    assert get_muon_momentum(10000, 10000, 0.65) == pytest.approx(0.90)
    # as upstream, the warmup wins over a warmdown that starts before step 400 (it blended toward 0.90 from ~0.88)
    assert get_muon_momentum(290, 300, 0.65) == pytest.approx(0.85 + 0.12 * 290 / 400)
    assert get_muon_momentum(3500, 5000, 0.65) == pytest.approx(0.97 * (1 - 1750 / 3250) + 0.90 * 1750 / 3250)
    assert get_muon_weight_decay(0, 100, 0.2) == pytest.approx(0.2)
    assert get_muon_weight_decay(50, 100, 0.2) == pytest.approx(0.1)
    assert get_muon_weight_decay(100, 100, 0.2) == pytest.approx(0.0, abs=1e-12)


def test_sizing_from_depth():
    args = base_train.parse_args(["--depth", "20"])
    config = base_train.model_config_from_args(args, 32768)
    assert (config.n_embd, config.n_head, config.n_kv_head, config.n_layer) == (1280, 10, 10, 20)
    assert base_train.model_config_from_args(base_train.parse_args(["--depth", "3"]), 100).n_embd == 256  # ceil(192/128)*128


def test_a_megacontext_run_defaults_to_its_own_tag_beside_its_vanilla_twin():
    tag = lambda *flags: base_train.checkpoint_tag(base_train.parse_args(["--depth", "12", *flags]))
    assert tag() == "d12"  # upstream's
    assert tag("--megacontext") == "d12_mc" and tag("--config", os.path.join(REPO, "configs", "d12_mc.toml")) == "d12_mc"
    assert tag("--megacontext", "--model-tag", "mine") == "mine"


def test_config_toml_sets_defaults_and_flags_override(tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text('depth = 3\nmax_seq_len = 128\n')
    args = base_train.parse_args(["--config", str(cfg), "--depth", "5"])
    assert args.depth == 5 and args.max_seq_len == 128
    cfg.write_text('depthh = 3\n')
    with pytest.raises(UserError, match="unknown key"):
        base_train.parse_args(["--config", str(cfg)])
    with pytest.raises(UserError, match="not found"):
        base_train.parse_args(["--config", str(tmp_path / "missing.toml")])
    # what a reviewer met: tracebacks, a hint to turn on what was on, keys that are not settings, one key twice
    for text, message in [("megacontext = true\nmc_w_maxx = 128\n", r"unknown key\(s\) mc_w_maxx \(did you mean mc_w_max\?\)"),
                          ("mc_w_max = 128\n", r"mc_w_max \(mc_\* keys need megacontext = true\)"),
                          ('config = "/elsewhere.toml"\n', "unknown key"), ("help = true\n", "unknown key"),
                          ("max-seq-len = 64\nmax_seq_len = 4096\n", "max_seq_len is given twice")]:
        cfg.write_text(text)
        with pytest.raises(UserError, match=message):
            base_train.parse_args(["--config", str(cfg)])
    cfg.write_bytes("depth = 3\n".encode("utf-16"))
    with pytest.raises(UserError, match="bad TOML in"):
        base_train.parse_args(["--config", str(cfg)])
    with pytest.raises(UserError, match="cannot read config"):
        base_train.parse_args(["--config", str(tmp_path)])


def test_each_megacontext_preset_trains_its_vanilla_twins_trunk():
    """configs/X_mc.toml is configs/X.toml plus megacontext and mc_* keys: the twins' comparison is fair only while
    every trunk setting (shape, batch, rates, data) is the same in both."""
    import tomllib
    presets = sorted(f for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith("_mc.toml"))
    assert len(presets) == 4
    for name in presets:
        with open(os.path.join(REPO, "configs", name), "rb") as f:
            mc = {k: v for k, v in tomllib.load(f).items() if k != "megacontext" and not k.startswith("mc_")}
        with open(os.path.join(REPO, "configs", name.replace("_mc.toml", ".toml")), "rb") as f:
            assert tomllib.load(f) == mc, name


def test_megacontext_settings_that_would_train_nothing_are_refused():
    """A reviewer's runs: a 4,065-token history whose coarsest WC costs 159 slots > w_max 128 trained GistNet and
    LensNet until C2 reached w_max and then nothing (no reference fits: lens loss nan, zero gradients); 2 variants
    left LensNet no pair (its loss the regularizer alone); alpha_lod2 with a 64-token horizon scored nothing."""
    preset = ["--config", os.path.join(REPO, "configs", "cpu_tiny_mc.toml")]
    for flags, message in [(["--max-seq-len", "4096"], "a 4065-token history costs 159 slots at its coarsest"),
                           (["--mc-num-variants", "2"], "mc_num_variants 2: LensNet learns from"),
                           (["--mc-max-level", "2", "--mc-alpha-lod2", "0.01"], "mc_alpha_lod2 0.01 trains nothing")]:
        with pytest.raises(UserError, match=message):
            base_train.main(preset + flags)
    for name in ("cpu_tiny_mc", "cpu_recall_mc", "d12_mc", "d20_mc"):  # the shipped presets pass
        args = base_train.parse_args(["--config", os.path.join(REPO, "configs", f"{name}.toml")])
        from nanochat.megacontext.config import from_args
        base_train.check_megacontext_run(from_args(args), args.max_seq_len + 1 - args.mc_horizon)


def test_the_trunks_numbers_must_be_finite_and_in_range():
    """--matrix-lr nan trained to loss nan and saved a checkpoint that could not be loaded (rc 0); --warmdown-ratio nan
    and --target-flops inf were tracebacks; negative learning rates were taken."""
    for flags, message in [(["--matrix-lr", "nan"], "--matrix-lr must be a finite number"),
                           (["--target-flops", "inf"], "--target-flops must be a finite number"),
                           (["--warmdown-ratio", "nan"], "--warmdown-ratio must be a finite number"),
                           (["--embedding-lr", "-1"], "--embedding-lr must be 0 or more"),
                           (["--final-lr-frac", "-5"], "--final-lr-frac must be 0 or more"),
                           (["--smear-lr", "-0.1"], "--smear-lr must be 0 or more"),
                           (["--warmdown-ratio", "1.5"], r"--warmdown-ratio must be in \[0, 1\]")]:
        with pytest.raises(UserError, match=message):
            base_train.parse_args(flags)
    assert base_train.parse_args(["--matrix-lr", "0"]).matrix_lr == 0  # a frozen group is allowed


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if v != v else "inf"
    return json.dumps(v) if not isinstance(v, dict) else "{}"


def checked(argv):
    """parse_args, then the settings' own checks (model size, MegaContext config) on what parsed:
    "ok", or the one-line UserError's text. Anything else (a traceback) fails the test."""
    try:
        args = base_train.parse_args(argv)
        base_train.model_config_from_args(args, 65536)
        if args.megacontext:
            from nanochat.megacontext.config import from_args
            from_args(args)
        return "ok"
    except UserError as e:
        assert "\n" not in str(e), str(e)
        return str(e)


@pytest.mark.parametrize("preset", sorted(os.listdir(os.path.join(REPO, "configs"))))
def test_fuzz_every_key_of_a_shipped_preset_with_a_value_of_every_type(tmp_path, preset):
    import tomllib
    text = open(os.path.join(REPO, "configs", preset)).read()
    values = tomllib.loads(text)
    cfg = tmp_path / preset
    for key, good in values.items():
        for bad in [True, -1, 0, 1.5, 10 ** 18, "2", "", [1], {}, float("nan"), float("inf")]:
            if type(bad) is type(good) and bad == good:
                continue
            lines = [line for line in text.splitlines() if not line.startswith(f"{key} =")]
            cfg.write_text("\n".join(lines + [f"{key} = {toml_value(bad)}"]) + "\n")
            outcome = checked(["--config", str(cfg)])
            same_kind = type(bad) is type(good) or (type(good) is float and type(bad) is int)
            if not same_kind:  # a value of another type: refused by name
                assert outcome.startswith(f"{cfg}: {key} must be "), (key, bad, outcome)
    for cut in sorted({1, 7, len(text) // 3, len(text) // 2, len(text) - 2} | set(range(0, len(text), max(1, len(text) // 25)))):
        cfg.write_text(text[:cut])  # a truncated preset: bad TOML, or a shorter valid one
        checked(["--config", str(cfg)])


def test_impossible_sizes_are_user_errors(base_dir):
    with pytest.raises(UserError, match="impossible sizes"):
        base_train.main(TINY + ["--total-batch-size", "100", "--num-iterations", "1", "--model-tag", "bad"])
    with pytest.raises(UserError, match="impossible model size"):
        base_train.main(TINY + ["--depth", "0", "--num-iterations", "1", "--model-tag", "bad"])
    with pytest.raises(UserError, match="--recall-window must be at least 1 token, got 0"):
        base_train.main(TINY + ["--recall-facts", "2", "--recall-window", "0", "--num-iterations", "1", "--model-tag", "bad"])
    for n in ("0", "-3"):  # not "derived" (-1): these fell back to the data-ratio length (a 7-hour run)
        with pytest.raises(UserError, match="--num-iterations must be at least 1"):
            base_train.main(TINY + ["--num-iterations", n, "--model-tag", "bad"])


def test_a_used_model_tag_is_refused_or_replaced_and_a_resumed_run_keeps_one_log(base_dir):
    """A fresh run beside an older one left the older's later step as the last (the one loaders pick) and
    appended to its log; a resumed run's log held the steps past its checkpoint twice."""
    common = TINY + ["--model-tag", "reuse", "--eval-every", "2"]
    ckpt = base_dir / "base_checkpoints" / "reuse"

    def log(ckpt=ckpt):
        rows = [json.loads(line) for line in (ckpt / "train_log.jsonl").read_text().splitlines()]
        return [r["step"] for r in rows if r["kind"] == "train"], [r["step"] for r in rows if r["kind"] == "eval"]

    base_train.main(common + ["--num-iterations", "4", "--save-every", "2"])
    assert log() == ([1, 2, 3, 4], [0, 2, 4])
    with pytest.raises(UserError, match=r"already holds a run's checkpoints \(steps 2, 4\): --overwrite replaces them, --resume-from-step"):
        base_train.main(common + ["--num-iterations", "2"])
    base_train.main(common + ["--num-iterations", "4", "--save-every", "2", "--resume-from-step", "2"])
    assert log() == ([1, 2, 3, 4], [0, 2, 4])
    # resumed from 2 into a shorter schedule: the abandoned step 4 would stay the last one loaders pick
    base_train.main(common + ["--num-iterations", "3", "--resume-from-step", "2"])
    assert find_last_step(str(ckpt)) == 3 and not any("000004" in f for f in os.listdir(ckpt))  # digests included
    assert log() == ([1, 2, 3], [0, 2, 3])
    # --overwrite keeps the old steps until the new run has saved its own: stopped before that, the model is still there
    real_save = base_train.save_checkpoint

    def killed(*args, **kwargs):
        raise Killed()
    base_train.save_checkpoint = killed
    try:
        with pytest.raises(Killed):
            base_train.main(common + ["--num-iterations", "2", "--overwrite"])
    finally:
        base_train.save_checkpoint = real_save
    assert find_last_step(str(ckpt)) == 3 and any("000002" in f for f in os.listdir(ckpt))
    base_train.main(common + ["--num-iterations", "2", "--overwrite"])  # saves its step 2 over the old one, then removes 3
    assert find_last_step(str(ckpt)) == 2 and not any("000003" in f for f in os.listdir(ckpt))
    assert json.loads((ckpt / "meta_000002.json").read_text())["user_config"]["num_iterations"] == 2
    assert log() == ([1, 2], [0, 2])
    from nanochat.tokenizer import get_tokenizer  # the meta names the tokenizer its ids mean (load_model checks it)
    assert json.loads((ckpt / "meta_000002.json").read_text())["tokenizer_fingerprint"] == get_tokenizer().fingerprint()
    # a run stopped before its first save leaves a log and no step: the next fresh run's log was appended to it
    base_train.save_checkpoint = killed
    try:
        with pytest.raises(Killed):
            base_train.main(TINY + ["--model-tag", "unsaved", "--eval-every", "2", "--num-iterations", "2"])
    finally:
        base_train.save_checkpoint = real_save
    assert log(ckpt.parent / "unsaved") == ([1, 2], [0, 2])
    base_train.main(TINY + ["--model-tag", "unsaved", "--eval-every", "2", "--num-iterations", "2"])
    assert log(ckpt.parent / "unsaved") == ([1, 2], [0, 2])


def test_resume_continues_exactly(base_dir):
    """6 steps straight == 3 steps, stop, resume from the step-3 checkpoint, 3 more steps."""
    common = TINY + ["--num-iterations", "6", "--eval-every", "3"]
    straight = base_train.main(common + ["--model-tag", "straight"])
    ckpt = base_dir / "base_checkpoints" / "straight"
    straight_weights = torch.load(ckpt / "model_000006.pt")

    first = base_train.main(common + ["--model-tag", "resumed", "--save-every", "3"])
    assert first["final_loss"] == straight["final_loss"]  # same run so far; now drop its last 3 steps
    for f in ("model_000006.pt", "meta_000006.json", "optim_000006_rank0.pt"):
        os.remove(base_dir / "base_checkpoints" / "resumed" / f)
    resumed = base_train.main(common + ["--model-tag", "resumed", "--resume-from-step", "3"])
    assert resumed["final_loss"] == straight["final_loss"]
    assert resumed["val_bpb"] == straight["val_bpb"]
    resumed_weights = torch.load(base_dir / "base_checkpoints" / "resumed" / "model_000006.pt")
    assert all(torch.equal(straight_weights[k], resumed_weights[k]) for k in straight_weights)
    # upstream writes the loader's position into the meta alone: a step-3 optimizer file without it resumes from there
    for f in ("model_000006.pt", "meta_000006.json", "optim_000006_rank0.pt"):
        os.remove(base_dir / "base_checkpoints" / "resumed" / f)
    optim_path = base_dir / "base_checkpoints" / "resumed" / "optim_000003_rank0.pt"
    optim = torch.load(optim_path)
    assert optim.pop("dataloader_state_dict") == json.loads((optim_path.parent / "meta_000003.json").read_text())["dataloader_state_dict"]
    save_without_digest(optim, optim_path)
    from_meta = base_train.main(common + ["--model-tag", "resumed", "--resume-from-step", "3"])
    assert (from_meta["final_loss"], from_meta["val_bpb"]) == (straight["final_loss"], straight["val_bpb"])


def test_a_resume_trains_at_its_own_flags_rates_and_refuses_a_damaged_loop_state(base_dir):
    """The optimizer file restored the saved rates over the flags: a run resumed with another --smear-lr (the testbed
    presets moved 0.2 -> 0.1) kept the old rate while its meta and report named the new one. A damaged optional
    loop_state number (min_smooth_loss) was a TypeError traceback."""
    common = TINY + ["--num-iterations", "4", "--eval-every", "-1", "--model-tag", "rates", "--save-every", "2", "--warmup-steps", "0"]
    base_train.main(common)
    ckpt = base_dir / "base_checkpoints" / "rates"
    for f in ("model_000004.pt", "meta_000004.json", "optim_000004_rank0.pt"):
        os.remove(ckpt / f)
    base_train.main(common + ["--resume-from-step", "2", "--smear-lr", "0.05", "--matrix-lr", "0.01"])
    adamw, muon = torch.load(ckpt / "optim_000004_rank0.pt")["optimizers"]
    assert 0.05 in [g["initial_lr"] for g in adamw["param_groups"]] and 0.2 not in [g["initial_lr"] for g in adamw["param_groups"]]
    lr_scale = (256 / base_train.B_REF) ** 0.5
    assert all(g["initial_lr"] == pytest.approx(0.01 * lr_scale) for g in muon["param_groups"])
    meta_path = ckpt / "meta_000002.json"
    meta = json.loads(meta_path.read_text())
    meta["loop_state"]["min_smooth_loss"] = "low"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="its meta's step / loop_state is damaged"):
        base_train.main(common + ["--resume-from-step", "2"])


class Killed(BaseException):
    """A kill -9 inside a save: nothing after that point runs (not even atomic_path's cleanup)."""


@pytest.mark.parametrize("kill_at", [1, 6, 11])  # 4 points per file (chmod, fsync, rename, dir fsync): optim, model, meta
def test_a_kill_inside_a_checkpoint_save_resumes_exactly_and_its_partial_files_are_removed(base_dir, kill_at):
    """Killed at a point of the step-6 save (each fsync / chmod / rename of its three files counts):
    the last complete checkpoint is step 3 (the meta of 6 never landed), the next run removes the partial files, resumes from it and ends bitwise where an unbroken run ends."""
    common = TINY + ["--num-iterations", "6", "--eval-every", "-1", "--save-every", "3"]
    base_train.main(common + ["--model-tag", "straight", "--overwrite"])  # one run per parameter, one tag
    straight = torch.load(base_dir / "base_checkpoints" / "straight" / "model_000006.pt")
    state = dict(armed=False, calls=0, dead=False)

    def point(fn):
        def wrapped(*args, **kwargs):
            if state["dead"]:
                raise Killed()
            if state["armed"]:
                state["calls"] += 1
                if state["calls"] == kill_at:
                    state["dead"] = True
                    raise Killed()
            return fn(*args, **kwargs)
        return wrapped

    real_remove, real_save = os.remove, base_train.save_checkpoint

    def save(checkpoint_dir, step, *args, **kwargs):
        state["armed"] = step == 6
        return real_save(checkpoint_dir, step, *args, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        for name in ("fsync", "chmod", "replace"):
            mp.setattr(os, name, point(getattr(os, name)))
        mp.setattr(os, "remove", lambda p: None if state["dead"] else real_remove(p))
        mp.setattr(base_train, "save_checkpoint", save)
        with pytest.raises(Killed):
            base_train.main(common + ["--model-tag", f"killed{kill_at}"])
    ckpt = base_dir / "base_checkpoints" / f"killed{kill_at}"
    assert [f for f in os.listdir(ckpt) if f.endswith(".tmp")]  # what the kill left
    last = find_last_step(str(ckpt))
    assert last == 3
    base_train.main(common + ["--model-tag", f"killed{kill_at}", "--resume-from-step", str(last)])
    assert not [f for f in os.listdir(ckpt) if f.endswith(".tmp")]
    resumed = torch.load(ckpt / "model_000006.pt")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_checkpoint_meta_and_metrics_log(base_dir):
    out = base_train.main(TINY + ["--num-iterations", "3", "--eval-every", "2", "--model-tag", "meta"])
    ckpt = base_dir / "base_checkpoints" / "meta"
    assert sorted(os.listdir(ckpt)) == ["meta_000003.json", "model_000003.pt", "model_000003.pt.sha256", "optim_000003_rank0.pt",
                                        "optim_000003_rank0.pt.sha256", "train_log.jsonl"]
    meta = json.loads((ckpt / "meta_000003.json").read_text())
    for key in ("step", "val_bpb", "model_config", "user_config", "device_batch_size", "max_seq_len",
                "total_batch_size", "dataloader_state_dict", "loop_state"):
        assert key in meta
    assert meta["step"] == 3 and meta["val_bpb"] == out["val_bpb"] and math.isfinite(meta["val_bpb"])
    assert {"pq_idx", "rg_idx", "epoch"} <= set(meta["dataloader_state_dict"])
    assert {"min_val_bpb", "smooth_train_loss", "total_training_time"} <= set(meta["loop_state"])
    assert meta["model_config"]["n_layer"] == 2 and meta["model_config"]["vocab_size"] == 512
    records = [json.loads(line) for line in (ckpt / "train_log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert train[-1]["tokens_seen"] == 3 * 256 and train[-1]["flops_seen"] > 0 and train[-1]["tok_per_sec"] > 0
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2, 3]
    # the checkpoint loads through the public API and gives a finite loss
    from nanochat.checkpoint_manager import load_model
    model, tokenizer, meta2 = load_model("base", "cpu", phase="eval", model_tag="meta")
    ids = torch.tensor([tokenizer.encode("def f(x):\n    return x", prepend=tokenizer.get_bos_token_id())])
    assert torch.isfinite(model(ids[:, :-1], ids[:, 1:]))


def test_smear_lr_reaches_the_optimizer_unscaled(base_dir):
    """--smear-lr is the smear/backout group's rate as given: 0 leaves backout_lambda at its init 0.2 and
    smear_lambda at 0 while the run trains; the default (upstream's 0.2, not batch-scaled) moves both."""
    def lambdas(tag, flags):
        base_train.main(TINY + ["--num-iterations", "3", "--eval-every", "-1", "--model-tag", tag] + flags)
        ckpt = base_dir / "base_checkpoints" / tag
        state = torch.load(ckpt / "model_000003.pt", map_location="cpu")
        groups = torch.load(ckpt / "optim_000003_rank0.pt", map_location="cpu")["optimizers"][0]["param_groups"]
        return state["backout_lambda"].item(), state["smear_lambda"].item(), sorted(g["initial_lr"] for g in groups)
    frozen = lambdas("frozen", ["--smear-lr", "0"])
    moved = lambdas("moved", [])
    assert frozen[:2] == (pytest.approx(0.2), 0.0)
    assert moved[0] != pytest.approx(0.2) and moved[1] != 0.0
    assert 0.0 in frozen[2] and 0.2 in moved[2] and len(frozen[2]) == len(moved[2]) == 6


def test_sigusr1_widens_a_cpu_run_to_every_core_it_may_use(tiny_base_dir):
    """The CPU job trains the recall testbed on half the cores and sends SIGUSR1 once the stages beside it end:
    from the next step the run uses every core of its affinity, and it goes on to the end."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tiny_base_dir), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    env.pop("NANOCHAT_DATASET", None)
    proc = subprocess.Popen([sys.executable, "-m", "scripts.base_train", *TINY, "--num-iterations", "150", "--eval-every", "-1",
                             "--model-tag", "usr1"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 00002/"):
            proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == 0, "".join(lines[-20:])
    widened = [line for line in lines if "SIGUSR1" in line]
    assert widened == [f"step {widened[0].split()[1]} SIGUSR1, training on {len(os.sched_getaffinity(0))} threads from here\n"]
    assert lines.index(widened[0]) < len(lines) - 10 and "step 00150/00150" in "".join(lines)


def test_cli_errors_are_one_line(tiny_base_dir, tmp_path):
    r = run_script(["--no-such-flag"], tiny_base_dir)
    assert r.returncode == 2 and "unrecognized arguments: --no-such-flag" in r.stderr
    r = run_script(TINY + ["--num-iterations", "1"], tmp_path)  # empty base dir: no tokenizer
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:") and "tokenizer" in r.stderr


def test_torchrun_two_ranks_cpu(tiny_base_dir):
    """DDP on CPU (gloo): two ranks train in lockstep, rank 0 writes the checkpoint plus one optim file
    per rank (each holding its share of the sharded Muon state); a 2-rank resume is exact."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tiny_base_dir), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}

    def torchrun(*flags):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "scripts/base_train.py", *TINY, "--eval-every", "2", "--model-tag", "ddp", *flags],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r
    r = torchrun("--num-iterations", "3", "--save-every", "2")
    ckpt = tiny_base_dir / "base_checkpoints" / "ddp"
    assert (ckpt / "optim_000002_rank0.pt").exists() and (ckpt / "optim_000002_rank1.pt").exists()
    o0, o1 = torch.load(ckpt / "optim_000002_rank0.pt"), torch.load(ckpt / "optim_000002_rank1.pt")
    assert o0["dataloader_state_dict"] != o1["dataloader_state_dict"]  # each rank reads its own row groups
    muon0, muon1 = o0["optimizers"][1]["state"], o1["optimizers"][1]["state"]
    assert muon0 and muon1 and not set(muon0) & set(muon1)  # Newton-Schulz sharded: disjoint shares of the matrices
    assert r.stdout.count("step 00003/00003") == 1  # only rank 0 prints
    straight = torch.load(ckpt / "model_000003.pt")
    torchrun("--num-iterations", "3", "--resume-from-step", "2")
    resumed = torch.load(ckpt / "model_000003.pt")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_core_metric_during_training(base_dir):
    from test_core_eval import make_tasks, build_bundle_zip, BundleServer
    from nanochat.core_eval import get_eval_bundle
    with BundleServer(build_bundle_zip(make_tasks())) as server:  # base_train finds it already in <base>/eval_bundle
        get_eval_bundle(server.url, base_dir=str(base_dir), backoff=0)
    base_train.main(TINY + ["--num-iterations", "2", "--eval-every", "-1", "--core-metric-every", "2",
                            "--core-metric-max-per-task", "4", "--model-tag", "core"])
    records = [json.loads(line) for line in (base_dir / "base_checkpoints" / "core" / "train_log.jsonl").read_text().splitlines()]
    core = [r for r in records if r["kind"] == "core"]
    assert len(core) == 1 and core[0]["step"] == 2
    assert -2.0 < core[0]["core_metric"] < 1.0
    assert len([k for k in core[0] if k.startswith("core/")]) == 6
    # a damaged bundle is refused before step 0, not after the last step (where it cost the whole run)
    os.remove(base_dir / "eval_bundle" / "eval_data" / "lm" / "words.jsonl")
    with pytest.raises(UserError, match="eval_data/lm/words.jsonl: FileNotFoundError"):
        base_train.main(TINY + ["--num-iterations", "2", "--eval-every", "-1", "--core-metric-every", "2",
                                "--model-tag", "core_damaged"])
    assert not (base_dir / "base_checkpoints" / "core_damaged" / "train_log.jsonl").exists()
    # --overwrite refused in its set-up: the earlier run's log stays with its checkpoints (it was deleted at the claim)
    log = (base_dir / "base_checkpoints" / "core" / "train_log.jsonl").read_text()
    with pytest.raises(UserError, match="eval_data/lm/words.jsonl: FileNotFoundError"):
        base_train.main(TINY + ["--num-iterations", "2", "--eval-every", "-1", "--core-metric-every", "2",
                                "--model-tag", "core", "--overwrite"])
    assert (base_dir / "base_checkpoints" / "core" / "train_log.jsonl").read_text() == log


def test_a_diverged_run_stops_in_one_line_instead_of_saving_a_nan_model(base_dir):
    """It trained on to NaN, saved a model no later stage loads, and ended "done: min val bpb" with step 0's figure."""
    with pytest.raises(UserError, match=r"step [12]: the training loss is no longer finite, the run diverged"):
        base_train.main(TINY + ["--num-iterations", "4", "--eval-every", "2", "--save-every", "2", "--model-tag", "diverged",
                                "--matrix-lr", "1e30", "--embedding-lr", "1e30"])
    assert not list((base_dir / "base_checkpoints" / "diverged").glob("model_*.pt"))


def test_a_spike_it_never_recovers_from_is_reported_not_passed_over(base_dir):
    """A run whose loss stays finite but ends far above its low (the recall testbed once went 0.53 -> 26 at step
    346 and recalled 0%) says so on its last line and in the report; a healthy run says nothing."""
    out = base_train.main(TINY + ["--num-iterations", "12", "--eval-every", "-1", "--warmup-steps", "0", "--model-tag", "spike",
                                  "--embedding-lr", "300", "--unembedding-lr", "300"])
    assert math.isfinite(out["final_loss"]) and out["spike"].startswith("the training loss spiked and never recovered")
    report = (base_dir / "report" / "base-model-training.md").read_text()
    assert "the training loss spiked" in report
    healthy = base_train.main(TINY + ["--num-iterations", "12", "--eval-every", "-1", "--model-tag", "healthy"])
    assert healthy["spike"] is None


def test_resume_errors_are_user_errors(base_dir):
    common = TINY + ["--eval-every", "-1", "--model-tag", "resume_err"]
    base_train.main(common + ["--num-iterations", "3"])
    with pytest.raises(UserError, match="only 2 iterations"):
        base_train.main(common + ["--num-iterations", "2", "--resume-from-step", "3"])
    with pytest.raises(UserError, match="differs from this run"):
        base_train.main(common + ["--num-iterations", "4", "--resume-from-step", "3", "--max-seq-len", "32"])
    ckpt = base_dir / "base_checkpoints" / "resume_err"
    save_without_digest({"state": {}, "param_groups": []}, ckpt / "optim_000003_rank0.pt")  # an upstream-style optimizer file
    with pytest.raises(UserError, match="lacks optimizers$"):  # the loader state falls back to the meta, as upstream keeps it
        base_train.main(common + ["--num-iterations", "4", "--resume-from-step", "3"])
    with pytest.raises(UserError, match="must be positive"):
        base_train.main(TINY + ["--target-param-data-ratio", "0", "--model-tag", "resume_err"])


def test_fuzz_damaged_optimizer_model_and_loader_state_refuse_the_resume_in_one_line(base_dir):
    """Each part of a checkpoint a resume reads, damaged one way at a time: a one-line UserError
    naming what (never a traceback at load or a few steps later)."""
    common = TINY + ["--eval-every", "-1", "--model-tag", "fuzz_resume"]
    base_train.main(common + ["--num-iterations", "2"])
    ckpt = base_dir / "base_checkpoints" / "fuzz_resume"
    optim_file, model_file = ckpt / "optim_000002_rank0.pt", ckpt / "model_000002.pt"
    good_optim, good_model = torch.load(optim_file, weights_only=True), torch.load(model_file, weights_only=True)
    good_digest = (ckpt / "optim_000002_rank0.pt.sha256").read_text()

    def state_with(d, name):  # the first parameter state holding `name`
        return next(st for opt in d["optimizers"] for st in opt["state"].values() if name in st)

    def tensor_named(d, name):
        return state_with(d, name)[name]

    damages = [
        ("optimizers", lambda d: d.update(optimizers=d["optimizers"][:1]), "optimizer states for this run's"),
        ("optimizers", lambda d: d.update(optimizers="adam"), "optimizer states for this run's"),
        ("param groups", lambda d: d["optimizers"][0].update(param_groups=[]), "cannot resume the optimizer from .*optim_000002_rank0.pt: ValueError"),
        ("state", lambda d: d["optimizers"][0].update(state=[1, 2]), "cannot resume the optimizer"),
        ("NaN moment", lambda d: tensor_named(d, "momentum_buffer").view(-1).__setitem__(0, float("nan")), "momentum_buffer holds NaN"),
        ("inf adam", lambda d: tensor_named(d, "exp_avg_sq").view(-1).__setitem__(0, float("inf")), "exp_avg_sq holds NaN"),
        ("shape", lambda d: state_with(d, "exp_avg").update(exp_avg=tensor_named(d, "exp_avg")[:1]), "exp_avg has shape"),
        ("loader", lambda d: d.update(dataloader_state_dict=[0, 0]), "dataloader resume state is damaged"),
        ("loader", lambda d: d["dataloader_state_dict"].update(pq_idx="0"), "dataloader resume state is damaged"),
        ("loader", lambda d: d["dataloader_state_dict"].update(buffer=[[0, 0]]), "dataloader resume state is damaged"),
        ("loader", lambda d: d["dataloader_state_dict"].update(rg_idx=10 ** 6), "does not match the train shards"),
    ]
    for what, damage, message in damages:
        bad = copy.deepcopy(good_optim)
        damage(bad)
        save_without_digest(bad, optim_file)
        with pytest.raises(UserError, match=message) as e:
            base_train.main(common + ["--num-iterations", "4", "--resume-from-step", "2"])
        assert "\n" not in str(e.value), what
    torch.save(bad, optim_file)
    (ckpt / "optim_000002_rank0.pt.sha256").write_text(good_digest)  # the damage under the saved digest
    with pytest.raises(UserError, match="optim_000002_rank0.pt does not match its checksum"):
        base_train.main(common + ["--num-iterations", "4", "--resume-from-step", "2"])
    save_without_digest(good_optim, optim_file)
    name = next(iter(good_model))
    for damage in [lambda d: d.pop(name), lambda d: d.update({name: d[name][:1]}), lambda d: d.update(extra=torch.zeros(1))]:
        bad = dict(good_model)
        damage(bad)
        save_without_digest(bad, model_file)
        with pytest.raises(UserError, match="model_000002.pt|its model file does not fit") as e:
            base_train.main(common + ["--num-iterations", "4", "--resume-from-step", "2"])
        assert "\n" not in str(e.value)
    torch.save(good_model, model_file)
    base_train.main(common + ["--num-iterations", "3", "--resume-from-step", "2"])  # intact again: resumes


def test_stale_token_bytes_is_a_user_error(tiny_base_dir, tmp_path, monkeypatch):
    import shutil
    shutil.copytree(tiny_base_dir / "tokenizer", tmp_path / "tokenizer")
    shutil.copytree(tiny_base_dir / "base_data_climbmix", tmp_path / "base_data_climbmix")
    save_without_digest(torch.ones(300, dtype=torch.int32), tmp_path / "tokenizer" / "token_bytes.pt")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError, match="token_bytes.pt has 300 entries"):
        base_train.main(TINY + ["--num-iterations", "1"])


# -----------------------------------------------------------------------------
# --megacontext: the same loop, plus GistNet + LensNet (nanochat/megacontext/training.py)

MC_TINY = TINY + ["--max-seq-len", "128", "--megacontext", "--mc-w-max", "64", "--mc-horizon", "32", "--mc-recent-tokens", "32",
                  "--mc-max-level", "1", "--mc-gist-layers", "1", "--mc-lens-layers", "1", "--mc-lens-hidden", "32",
                  "--mc-num-variants", "4", "--mc-anneal-frac", "0.5", "--mc-tau-expand", "0", "--mc-tau-collapse", "0"]


def test_megacontext_resume_continues_exactly_and_checkpoints_round_trip(base_dir):
    """4 steps straight == 2 steps, stop, resume, 2 more: the base model, GistNet and LensNet bitwise."""
    common = MC_TINY + ["--num-iterations", "4", "--eval-every", "2"]
    straight = base_train.main(common + ["--model-tag", "mc_straight"])
    ckpt = base_dir / "base_checkpoints" / "mc_straight"
    first = base_train.main(common + ["--model-tag", "mc_resumed", "--save-every", "2"])
    assert first["final_loss"] == straight["final_loss"]
    resumed_dir = base_dir / "base_checkpoints" / "mc_resumed"
    for f in ("model_000004.pt", "meta_000004.json", "optim_000004_rank0.pt", "mc_000004.pt"):
        os.remove(resumed_dir / f)
    # resumed without --megacontext it went on as a vanilla run, its GistNet and LensNet dropped
    with pytest.raises(UserError, match="step 2 .*: it is a MegaContext run: resume it with its --megacontext settings"):
        base_train.main(TINY + ["--max-seq-len", "128", "--num-iterations", "4", "--model-tag", "mc_resumed", "--resume-from-step", "2"])
    resumed = base_train.main(common + ["--model-tag", "mc_resumed", "--resume-from-step", "2"])
    assert resumed["final_loss"] == straight["final_loss"] and resumed["val_bpb"] == straight["val_bpb"]
    for name in ("model_000004.pt", "mc_000004.pt"):
        a, b = torch.load(ckpt / name), torch.load(resumed_dir / name)
        if name.startswith("mc_"):
            assert a["mc_config"] == b["mc_config"] and a["optimizer"] is not None
            a, b = {**a["gistnet"], **{"lens." + k: v for k, v in a["lensnet"].items()}}, {**b["gistnet"], **{"lens." + k: v for k, v in b["lensnet"].items()}}
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # failure mode 2: the saved GistNet / LensNet are trained weights, not their initialization
    from nanochat.checkpoint_manager import build_model
    from nanochat.megacontext.checkpoint import build_modules, load_megacontext
    model, _, meta = build_model(str(ckpt), 4, "cpu", "eval")  # the vanilla loader ignores mc_*.pt
    assert meta["megacontext"]["w_max"] == 64
    mc, gistnet, lensnet, _ = load_megacontext(str(ckpt), 4, model.config, "cpu")
    fresh_gist, fresh_lens = build_modules(mc, model.config)
    assert not torch.equal(gistnet.encoders[0].head.weight, fresh_gist.encoders[0].head.weight)
    assert not torch.equal(lensnet.head.weight, fresh_lens.head.weight)
    assert set(torch.load(ckpt / "model_000004.pt").keys()) == set(model.state_dict().keys())  # the vanilla key set
    records = [json.loads(line) for line in (ckpt / "train_log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    for key in ("mc/horizon_loss", "mc/gist_cos_lod1", "mc/lens_loss", "mc/lens_agree", "mc/swap_rate", "mc/budget_util",
                "mc/lod0_frac", "mc/lod1_frac", "mc/controller_ms", "mc/budget", "tokens_seen", "flops_seen", "wall_s"):
        assert key in train[-1], key
    assert train[0]["mc/budget"] > 64 and train[-1]["mc/budget"] == 64  # C2 annealed down to w_max
    evals = [r for r in records if r["kind"] == "eval"]  # failure mode 10: each eval also runs the MegaContext path
    assert [r["step"] for r in evals] == [0, 2, 4]
    for key in ("mc_val/gap_closed", "mc_val/nll_trunc", "mc_val/nll_mc", "mc_val/nll_full", "mc_val/dnll_lod1", "mc_val/budget_violations"):
        assert key in evals[-1], key
    assert evals[-1]["mc_val/budget_violations"] == 0 and evals[-1]["mc_val/nll_full"] > 0


def test_vanilla_and_megacontext_twins_see_the_same_tokens_in_the_same_order(base_dir):
    vanilla_args = TINY + ["--max-seq-len", "128"]
    common = ["--num-iterations", "2", "--eval-every", "-1"]
    base_train.main(vanilla_args + common + ["--model-tag", "twin_vanilla"])
    base_train.main(MC_TINY + common + ["--model-tag", "twin_mc"])
    logs = {}
    for tag in ("twin_vanilla", "twin_mc"):
        lines = (base_dir / "base_checkpoints" / tag / "train_log.jsonl").read_text().splitlines()
        logs[tag] = [json.loads(line) for line in lines if json.loads(line)["kind"] == "train"]
    v, m = logs["twin_vanilla"], logs["twin_mc"]
    assert [r["tokens_seen"] for r in v] == [r["tokens_seen"] for r in m]
    assert v[0]["loss"] == m[0]["loss"]  # same init, same first batch: the same next-token loss before any update
    assert m[-1]["flops_seen"] > v[-1]["flops_seen"]  # the MegaContext work is counted


def test_megacontext_settings_that_cannot_work_are_user_errors(base_dir):
    with pytest.raises(UserError, match="must be longer than mc_w_max"):
        base_train.main(MC_TINY + ["--max-seq-len", "64", "--num-iterations", "1"])
    base_train.main(MC_TINY + ["--num-iterations", "2", "--eval-every", "-1", "--model-tag", "mc_change"])
    with pytest.raises(UserError, match="MegaContext settings differ in w_max"):
        base_train.main(MC_TINY + ["--num-iterations", "3", "--eval-every", "-1", "--model-tag", "mc_change",
                                   "--resume-from-step", "2", "--mc-w-max", "96"])


def test_long_range_documents_reach_the_training_loader(base_dir):
    with pytest.raises(UserError, match="long-range documents of 100000 tokens do not fit"):
        base_train.main(TINY + ["--num-iterations", "1", "--long-range-frac", "0.5", "--long-range-tokens", "100000"])
    # too short: counted as the flag counts (BOS included; it said "more than the 39 asked for" of --long-range-tokens 40)
    with pytest.raises(UserError, match=r"long-range documents of 40 tokens \(BOS included\): a \w+ document needs at least \d+$") as e:
        base_train.main(TINY + ["--num-iterations", "1", "--eval-every", "-1", "--long-range-frac", "0.5", "--long-range-tokens", "40"])
    assert int(str(e.value).split()[-1]) > 40
    out = base_train.main(TINY + ["--num-iterations", "1", "--eval-every", "-1", "--long-range-frac", "0.5", "--model-tag", "lr_mix"])
    plain = base_train.main(TINY + ["--num-iterations", "1", "--eval-every", "-1", "--model-tag", "lr_plain"])
    assert out["final_loss"] != plain["final_loss"]  # other documents in the first batch


def test_torchrun_two_ranks_megacontext(tiny_base_dir):
    """DDP with --megacontext: GistNet / LensNet gradients are averaged too, even in a step where one
    of them gets none on some rank (step 0: C2 covers every history, so no LensNet work)."""
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(tiny_base_dir), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "scripts/base_train.py", *MC_TINY, "--total-batch-size", "512", "--num-iterations", "3",
                        "--eval-every", "-1", "--model-tag", "ddp_mc"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tiny_base_dir / "base_checkpoints" / "ddp_mc" / "mc_000003.pt").exists()


def test_cognitive_core_training_logs_its_reliance(base_dir):
    with pytest.raises(UserError, match="--cognitive-core needs --megacontext"):
        base_train.main(TINY + ["--num-iterations", "1", "--cognitive-core"])
    base_train.main(MC_TINY + ["--num-iterations", "3", "--eval-every", "-1", "--cognitive-core", "--model-tag", "mc_core"])
    ckpt = base_dir / "base_checkpoints" / "mc_core"
    records = [json.loads(line) for line in (ckpt / "train_log.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "train"][-1]
    assert last["mc/budget"] == 64 and last["mc/ckri"] == last["mc/ckri"] and last["mc/ck_margin_loss"] >= 0
    assert last["mc/nll_drop"] > 0 and last["mc/lens_loss"] > 0
    assert torch.load(ckpt / "mc_000003.pt")["mc_config"]["cognitive_core"] is True


RECALL = ["--depth", "2", "--aspect-ratio", "64", "--head-dim", "64", "--max-seq-len", "512", "--window-pattern", "L",
          "--device-batch-size", "1", "--total-batch-size", "512", "--eval-tokens", "512", "--core-metric-every", "-1",
          "--sample-every", "-1", "--warmup-steps", "1", "--device-type", "cpu", "--weight-decay", "0",
          "--recall-facts", "2", "--recall-short-len", "128", "--recall-short-steps", "2", "--recall-eval-docs", "2",
          "--recall-window", "64", "--num-iterations", "4", "--eval-every", "2"]
RECALL_MC = RECALL + ["--megacontext", "--mc-w-max", "64", "--mc-horizon", "64", "--mc-recent-tokens", "32", "--mc-max-level", "1",
                      "--mc-gist-kind", "mean", "--mc-gist-pooling", "mean", "--mc-lens-layers", "1", "--mc-lens-hidden", "32",
                      "--mc-num-variants", "4", "--mc-anneal-frac", "0.25", "--mc-eval-rows", "0"]


@pytest.mark.parametrize("flags", [RECALL, RECALL_MC], ids=["vanilla", "megacontext"])
def test_recall_rows_train_log_recall_and_resume_exactly(base_dir, flags):
    """The recall data mode end to end: the short-row curriculum, the recall probe at each eval (and, with
    --megacontext, the fact stats each step), and a resume from step 2 that ends bitwise where 4 straight did."""
    tag = "recall_" + ("mc" if "--megacontext" in flags else "vanilla")
    straight = base_train.main(flags + ["--model-tag", tag])
    ckpt = base_dir / "base_checkpoints" / tag
    records = [json.loads(line) for line in (ckpt / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4]
    methods = ("full", "truncation", "megacontext") if "--megacontext" in flags else ("full", "truncation")
    assert all(0 <= evals[-1][f"recall/{m}"] <= 1 for m in methods)
    # the report keeps the testbed apart from the pipeline's base model (the main job trains both)
    report = base_dir / "report"
    assert f"- model_tag: {tag}\n" in (report / "recall-testbed-training.md").read_text()
    base_section = report / "base-model-training.md"
    assert not base_section.exists() or f"- model_tag: {tag}\n" not in base_section.read_text()
    if "--megacontext" in flags:
        train = [r for r in records if r["kind"] == "train"]
        assert all(k in train[-1] for k in ("mc/fact_raw_lens", "mc/fact_lens_top", "mc/gist_pair_cos"))
        assert train[-1]["mc/gist_pair_cos"] < 0.99  # mean gists: different blocks, different gists
    weights = torch.load(ckpt / "model_000004.pt")
    base_train.main(flags + ["--model-tag", tag + "_r", "--save-every", "2", "--num-iterations", "4"])
    resumed_dir = base_dir / "base_checkpoints" / (tag + "_r")
    for f in os.listdir(resumed_dir):
        if "000004" in f:
            os.remove(resumed_dir / f)
    resumed = base_train.main(flags + ["--model-tag", tag + "_r", "--resume-from-step", "2"])
    assert resumed["final_loss"] == straight["final_loss"]
    again = torch.load(resumed_dir / "model_000004.pt")
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_seed_draws_other_weights_rows_and_slates_reproducibly_and_resume_keeps_it(base_dir, monkeypatch):
    """--seed 0 is the default run; --seed 1 is another one (initial weights, recall rows, slates), the same
    twice; a checkpoint of one seed refuses to resume under another."""
    from nanochat.megacontext.training import MegaContextTrainer
    seeds = []  # (what, seed) as base_train hands them on
    loader, build = base_train.recall_loader, MegaContextTrainer.build.__func__
    monkeypatch.setattr(base_train, "recall_loader", lambda *a, seed=0, **k: seeds.append(("rows", seed)) or loader(*a, seed=seed, **k))
    monkeypatch.setattr(MegaContextTrainer, "build", classmethod(lambda cls, *a, seed=0, **k: seeds.append(("slates", seed)) or build(cls, *a, seed=seed, **k)))
    flags = RECALL_MC + ["--num-iterations", "2", "--eval-every", "-1"]
    default = base_train.main(flags + ["--model-tag", "seed_default"])
    zero = base_train.main(flags + ["--model-tag", "seed_zero", "--seed", "0"])
    one = base_train.main(flags + ["--model-tag", "seed_one", "--seed", "1"])
    again = base_train.main(flags + ["--model-tag", "seed_one_again", "--seed", "1"])
    assert seeds == [("slates", 0), ("rows", 0)] * 2 + [("slates", 1), ("rows", 1)] * 2
    assert zero["final_loss"] == default["final_loss"]
    assert one["final_loss"] == again["final_loss"] != default["final_loss"]
    ckpt = base_dir / "base_checkpoints"
    w0, w1 = (torch.load(ckpt / tag / "model_000002.pt") for tag in ("seed_default", "seed_one"))
    assert not torch.equal(w0["transformer.wte.weight"], w1["transformer.wte.weight"])
    # the recall rows themselves differ (not only the weights that read them)
    from nanochat.recall import recall_loader
    from nanochat.tokenizer import get_tokenizer
    rows = [next(recall_loader(get_tokenizer(), 1, 256, "train", 2, seed=s))[0] for s in (0, 1)]
    assert not torch.equal(*rows)
    with pytest.raises(UserError, match="trained with --seed 1, this run has --seed 0"):
        base_train.main(flags + ["--model-tag", "seed_one", "--resume-from-step", "2"])
    with pytest.raises(UserError, match="--seed must be 0 or more"):
        base_train.main(flags + ["--seed", "-1"])
