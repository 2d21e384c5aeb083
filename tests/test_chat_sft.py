import os
import sys
import json
import shutil
import subprocess

import torch

import pytest

from scripts.chat_sft import sft_batches, sft_loss, lr_multiplier, muon_momentum, warm_start
from nanochat.gpt import GPT, GPTConfig
from tasks.identity import Identity

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_packing_rows_are_whole_conversations_then_bos_padding(base_dir):
    """Each row = whole rendered conversations back to back, then BOS padding; the targets are
    the next tokens where the tokenizer's mask says assistant, -1 everywhere else."""
    from nanochat.tokenizer import get_tokenizer
    tokenizer = get_tokenizer()
    data = Identity()
    B, T = 4, 256
    rendered = [tokenizer.render_conversation(c, max_tokens=T + 1) for c in data]
    x, y, used = next(sft_batches(data, tokenizer, B, T, "cpu"))
    assert x.shape == y.shape == (B, T)
    bos = tokenizer.get_bos_token_id()
    for r in range(B):
        row = x[r].tolist() + [None]  # the (T+1)-th token is only visible through the targets
        expected = []
        p = 0
        while True:
            match = next(((ids, mask) for ids, mask in rendered if row[p:p + len(ids)] == ids or
                          (p + len(ids) == T + 1 and row[p:T] == ids[:-1])), None)
            if match is None:
                break
            ids, mask = match
            expected += [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
            expected.append(None)  # the boundary target: next conversation's BOS (or padding), checked below
            p += len(ids)
        assert p > 0, "a row must start with a whole conversation"
        assert all(t == bos for t in row[p:T])  # the rest is BOS padding
        targets = y[r].tolist()
        for i, e in enumerate(expected[:T]):
            if e is not None:
                assert targets[i] == e
        assert all(t == -1 for t in targets[p:])   # padding is never a target
        assert all(t == -1 for i, t in enumerate(targets[:p]) if i < len(expected) and expected[i] is None)
    # used counts the conversations placed (upstream's epoch progress), on rank 1 of 2 as every rank's share
    user_start = tokenizer.encode_special("<|user_start|>")
    placed = int(((x[:, :-1] == bos) & (x[:, 1:] == user_start)).sum())  # a conversation starts BOS <|user_start|>
    assert used == placed
    _, _, used_rank1 = next(sft_batches(data, tokenizer, B, T, "cpu", rank=1, world_size=2))
    assert used_rank1 % 2 == 1 and used_rank1 > 2


def test_sft_then_cli_then_eval_end_to_end(base_dir, tmp_path):
    """A saved base model -> chat_sft (offline mixture) -> chat_cli answer -> chat_eval offline tasks -> chat_rl."""
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.checkpoint_manager import find_last_step, save_checkpoint
    config = GPTConfig(sequence_len=256, vocab_size=512, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model = GPT(config)
    model.init_weights()
    base = tmp_path / "base"  # its own base dir: the one base model tag there is the one the scripts find without -g
    shutil.copytree(base_dir / "tokenizer", base / "tokenizer")
    save_checkpoint(str(base / "base_checkpoints" / "chat"), 3, model.state_dict(), None, {"step": 3, "model_config": config.to_dict()})
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}

    def run(*args, stdin=None):
        r = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                           input=stdin)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    # no -g: the tag found ("chat", not a d<N>) names the output (it went to chatsft_checkpoints/d2, away from the
    # MegaContext weights of its base tag)
    run("scripts.chat_sft", "--num-iterations", "4", "--eval-every", "2", "--eval-steps", "1",
        "--device-batch-size", "2", "--total-batch-size", "512", "--device-type", "cpu")
    ckpt = base / "chatsft_checkpoints" / "chat"
    meta = json.loads((ckpt / "meta_000004.json").read_text())
    assert meta["model_config"] == config.to_dict() and meta["val_loss"] > 0 and len(meta["tokenizer_fingerprint"]) == 16
    sft = torch.load(ckpt / "model_000004.pt")
    assert not torch.equal(sft["lm_head.weight"], model.state_dict()["lm_head.weight"])  # it trained
    out = run("scripts.chat_cli", "-g", "chat", "-p", "What is 2 plus 2?", "-t", "0", "--max-tokens", "8", "--device-type", "cpu")
    assert out.strip()
    out = run("scripts.chat_cli", "-g", "chat", "-t", "0", "--max-tokens", "4", "--device-type", "cpu", stdin="hi\nclear\nhello\nquit\n")
    assert out.count("Assistant:") == 2 and "(new conversation)" in out
    out = run("scripts.chat_eval", "-i", "sft", "-g", "chat", "-a", "Arithmetic,Spelling", "-x", "2", "-m", "8", "--device-type", "cpu")
    # a subset (other tasks than the default list, -x problems) is named for what it averages and saved apart:
    # it replaced the full run's results file
    assert "Arithmetic:" in out and "ChatCORE over Arithmetic, Spelling (2 problems each):" in out
    result = json.loads((base / "chat_eval" / "sft_chat_4_Arithmetic-Spelling_x2.json").read_text())
    assert set(result["results"]) == {"Arithmetic", "Spelling"} and result["full"] is False
    assert not (base / "chat_eval" / "sft_chat_4.json").exists()
    run("scripts.chat_rl", "--model-tag", "chat", "--num-iterations", "2", "--eval-every", "-1", "--eval-problems", "2",
        "--problems-per-step", "1", "--num-samples", "2", "--max-new-tokens", "8", "--device-type", "cpu")
    rl_meta = json.loads((base / "chatrl_checkpoints" / "chat" / "meta_000002.json").read_text())
    assert rl_meta["task"] == "Arithmetic" and 0.0 <= rl_meta["pass_at_1"] <= 1.0
    # a second, shorter SFT run under the same tag: refused (its step 2 would sit below the old run's step 4, the
    # one every loader picks), or with --overwrite the only checkpoint there
    again = ["scripts.chat_sft", "--model-tag", "chat", "--num-iterations", "2", "--eval-every", "-1", "--eval-steps", "1",
             "--device-batch-size", "2", "--total-batch-size", "512", "--device-type", "cpu"]
    r = subprocess.run([sys.executable, "-m", *again], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "(steps 4): --overwrite replaces them" in lines[0], r.stderr
    run(*again, "--overwrite")
    assert find_last_step(str(ckpt)) == 2
    # SFT continued from its own checkpoint (--source sft, the same tag): the step it starts from stays until the new
    # one is saved (it was removed before training: a run stopped early left no model at all)
    more = ["scripts.chat_sft", "--source", "sft", "--overwrite", "--eval-every", "-1", "--eval-steps", "1",
            "--device-batch-size", "2", "--total-batch-size", "512", "--device-type", "cpu"]
    proc = subprocess.Popen([sys.executable, "-m", *more, "--num-iterations", "500"], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        for line in proc.stdout:
            if line.startswith("step 00001/"):
                break
    finally:
        proc.kill()
        proc.wait()
    assert find_last_step(str(ckpt)) == 2 and (ckpt / "model_000002.pt").exists()
    run(*more, "--num-iterations", "3")
    assert find_last_step(str(ckpt)) == 3 and not any("000002" in f for f in os.listdir(ckpt))
    assert json.loads((ckpt / "meta_000003.json").read_text())["source"] == {"kind": "sft", "model_tag": "chat", "step": 2}
    # it carried over the SFT run's optimizer state: AdamW's step count goes on from the 2 steps before
    adam = torch.load(ckpt / "optim_000003_rank0.pt")["optimizers"][0]
    assert {int(v["step"]) for v in adam["state"].values()} == {5}


def test_sft_loss_is_per_assistant_token_and_zero_when_none():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L"))
    model.init_weights()
    x = torch.randint(0, 64, (2, 16))
    y = torch.randint(0, 64, (2, 16))
    y[0, :10] = -1
    per_token = model(x, y, loss_reduction="none")  # (B, T), 0 where masked
    assert torch.allclose(sft_loss(model, x, y), per_token.sum() / 22, atol=1e-6)
    none = torch.full_like(y, -1)
    loss = sft_loss(model, x, none)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()  # an all-masked micro-batch still steps cleanly
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_upstreams_schedule_flat_then_linear_to_zero_and_the_momentum_ramp():
    assert [lr_multiplier(p, 0.0, 0.5, 0.0) for p in (0.0, 0.3, 0.5)] == [1.0, 1.0, 1.0]
    assert lr_multiplier(0.75, 0.0, 0.5, 0.0) == pytest.approx(0.5) and lr_multiplier(1.0, 0.0, 0.5, 0.0) == pytest.approx(0.0)
    assert lr_multiplier(0.75, 0.0, 0.5, 0.2) == pytest.approx(0.6)
    assert lr_multiplier(0.05, 0.1, 0.5, 0.0) == pytest.approx(0.5, rel=1e-6)  # warming up
    # the CPU recipe: --warmdown-ratio 1 at progress step / N is the old linear decay 1 - step / N
    assert all(lr_multiplier(k / 400, 0.0, 1.0, 0.0) == pytest.approx(1 - k / 400) for k in range(400))
    assert [muon_momentum(k, 300) for k in (0, 150, 300, 900)] == pytest.approx([0.85, 0.90, 0.95, 0.95])
    assert muon_momentum(0, 0) == 0.95


def test_warm_start_carries_the_moments_over_and_keeps_the_fresh_rates(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, window_pattern="L"))
    model.init_weights()
    base = model.setup_optimizers(lr_multiplier=1.0)
    for _ in range(3):  # a "base run": three steps of real moments
        model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))).backward()
        for opt in base:
            opt.step()
        model.zero_grad(set_to_none=True)
    for group in base[1].param_groups:
        group["weight_decay"] = 1e-4  # the base run's last scheduled Muon decay
    path = tmp_path / "optim_000003_rank0.pt"
    torch.save(dict(optimizers=[opt.state_dict() for opt in base]), path)
    sft = model.setup_optimizers(lr_multiplier=0.8, weight_decay=0.0)
    assert warm_start(sft, str(path), "cpu", weight_decay=0.0)  # --weight-decay 0 given: kept
    assert [g["weight_decay"] for g in sft[1].param_groups] == [0.0] * len(sft[1].param_groups)
    sft = model.setup_optimizers(lr_multiplier=0.8, weight_decay=0.0)
    fresh_lrs = [[g["lr"] for g in opt.param_groups] for opt in sft]
    assert warm_start(sft, str(path), "cpu")  # the default: upstream's, the base run's decay comes with its state
    assert [[g["lr"] for g in opt.param_groups] for opt in sft] == fresh_lrs
    assert [g["weight_decay"] for g in sft[1].param_groups] == [1e-4] * len(sft[1].param_groups)
    assert [[g["initial_lr"] for g in opt.param_groups] for opt in sft] == fresh_lrs
    for mine, theirs in zip(sft, base):
        for p in theirs.state:
            for name, value in theirs.state[p].items():
                assert torch.equal(torch.as_tensor(mine.state[p][name]), torch.as_tensor(value)), name
    assert not warm_start(model.setup_optimizers(), str(tmp_path / "missing.pt"), "cpu")  # none there: a fresh optimizer
    torch.save(dict(optimizers=[base[0].state_dict()]), path)
    from nanochat.common import UserError
    with pytest.raises(UserError, match="--load-optimizer 0"):
        warm_start(model.setup_optimizers(), str(path), "cpu")


def tiny_base_model(base_dir, tmp_path):
    """A 1-layer GPT (seed 0) and a fresh base dir holding the tiny tokenizer -> (model, config, base dir)."""
    config = GPTConfig(sequence_len=128, vocab_size=512, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    base = tmp_path / "base"
    shutil.copytree(base_dir / "tokenizer", base / "tokenizer")
    return model, config, base


def test_the_default_run_is_one_epoch_at_the_checkpoint_runs_batch_and_rates(base_dir, tmp_path, monkeypatch, capsys):
    """Upstream's default: the data ends the run (one epoch, the micro-batch that crosses it not trained on); the
    batch and the rates are the base run's (its meta), x 0.8; the base run's optimizer state is carried over."""
    from nanochat.checkpoint_manager import save_checkpoint, find_last_step
    from nanochat.tokenizer import get_tokenizer
    from scripts import chat_sft
    from tasks.common import TaskMixture
    model, config, base = tiny_base_model(base_dir, tmp_path)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    base_opts = model.setup_optimizers()
    for group in base_opts[1].param_groups:
        group["momentum"] = 0.5  # the base run's last scheduled momentum: the ramp must replace it
    optim = dict(optimizers=[opt.state_dict() for opt in base_opts])
    user = dict(embedding_lr=0.5, unembedding_lr=0.01, matrix_lr=0.03)
    save_checkpoint(str(base / "base_checkpoints" / "ep"), 7, model.state_dict(), optim,
                    {"step": 7, "model_config": config.to_dict(), "device_batch_size": 2, "total_batch_size": 512, "user_config": user})
    data = TaskMixture([Identity()])
    monkeypatch.setattr(chat_sft, "build_mixture", lambda name, split: data)
    # where the data ends: replay the batches (2 rows of 129 tokens, 2 micro-batches a step)
    batches, fetched = sft_batches(data, get_tokenizer(), 2, 128, "cpu"), 1
    while next(batches)[2] < len(data):
        fetched += 1
    steps = fetched // 2  # the step that fetched the crossing micro-batch is the last; begun, it trains both of its own
    monkeypatch.setattr(sys, "argv", ["chat_sft", "--model-tag", "ep", "--eval-every", "-1", "--eval-steps", "1", "--device-type", "cpu"])
    chat_sft.main()
    out = capsys.readouterr().out
    ckpt = base / "chatsft_checkpoints" / "ep"
    assert find_last_step(str(ckpt)) == steps > 2
    assert "optimizer state carried over" in out and "% of the epoch" in out
    meta = json.loads((ckpt / f"meta_{steps:06d}.json").read_text())
    assert {k: meta["user_config"][k] for k in user} == user and meta["total_batch_size"] == 512 and meta["device_batch_size"] == 2
    assert meta["user_config"]["init_lr_frac"] == 0.8
    muon = torch.load(ckpt / f"optim_{steps:06d}_rank0.pt")["optimizers"][1]
    assert [g["momentum"] for g in muon["param_groups"]] == [pytest.approx(muon_momentum(steps - 1, 300))] * len(muon["param_groups"])
    # no ramp: 0.95, not the base run's carried-over 0.5
    monkeypatch.setattr(sys, "argv", ["chat_sft", "--model-tag", "ep", "--overwrite", "--num-iterations", "1", "--momentum-ramp-steps", "0",
                                      "--eval-every", "-1", "--eval-steps", "1", "--device-type", "cpu"])
    chat_sft.main()
    muon = torch.load(ckpt / "optim_000001_rank0.pt")["optimizers"][1]
    assert [g["momentum"] for g in muon["param_groups"]] == [0.95] * len(muon["param_groups"])


def test_a_conversation_renders_to_at_most_2048_tokens_as_upstream(base_dir):
    """Upstream renders SFT conversations with max_tokens=2048: at T = 2048 the row's last (2,049th) token was
    still the conversation's (a trained assistant token) here; now it is BOS padding, as there."""
    from nanochat.tokenizer import get_tokenizer
    tokenizer = get_tokenizer()
    conv = {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "hello " * 3000}]}
    ids, mask = tokenizer.render_conversation(conv, max_tokens=4096)
    assert len(ids) > 2049 and mask[2048] == 1  # the 2,049th token is an assistant token
    x, y, _ = next(sft_batches([conv], tokenizer, 1, 2048, "cpu"))
    assert x[0].tolist() == ids[:2048]
    assert y[0, -1].item() == -1  # the padding after a 2,048-token conversation, never a target
    assert (y[0, :-1] == torch.tensor(ids[1:2048]).masked_fill(~torch.tensor(mask[1:2048], dtype=torch.bool), -1)).all()
    x, y, _ = next(sft_batches([conv], tokenizer, 1, 256, "cpu"))  # a shorter row: cropped to its own T + 1
    assert x[0].tolist() == ids[:256] and y[0, -1].item() == ids[256]


def test_a_warm_start_on_more_ranks_than_the_base_run_stops_every_rank_in_one_line(base_dir, tmp_path):
    """A 1-rank base run fine-tuned on 2 ranks: rank 0 has the run's optimizer shard, rank 1 none. Rank 1 used to
    train a fresh optimizer beside rank 0's refusal and die in the gradient all-reduce (a hang on NCCL); both ranks
    now count the shards and stop with the same line. --load-optimizer 0 trains on the two ranks."""
    from nanochat.checkpoint_manager import save_checkpoint, find_last_step
    model, config, base = tiny_base_model(base_dir, tmp_path)
    optim = dict(optimizers=[opt.state_dict() for opt in model.setup_optimizers()])
    save_checkpoint(str(base / "base_checkpoints" / "one"), 3, model.state_dict(), optim,  # optim_000003_rank0.pt only
                    {"step": 3, "model_config": config.to_dict(), "device_batch_size": 2, "total_batch_size": 512})
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}

    def torchrun(*flags):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "scripts/chat_sft.py", "--model-tag", "one", "--num-iterations", "1", "--eval-every", "-1",
                               "--eval-steps", "1", "--device-type", "cpu", *flags],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    r = torchrun()
    assert r.returncode != 0
    line = "error: the checkpoint's run saved optimizer state for 1 of this run's 2 ranks"
    assert r.stderr.count(line) == 2, r.stderr[-3000:]  # each rank refuses, none trains on
    assert "| loss" not in r.stdout and "SFT of" not in r.stdout
    assert not (base / "chatsft_checkpoints" / "one").exists()
    r = torchrun("--load-optimizer", "0")
    assert r.returncode == 0, r.stderr[-3000:]
    assert find_last_step(str(base / "chatsft_checkpoints" / "one")) == 1
