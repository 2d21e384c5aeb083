import os
import sys
import json
import shutil
import subprocess

import torch

from scripts.chat_sft import sft_batches, sft_loss
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
    x, y = next(sft_batches(data, tokenizer, B, T, "cpu"))
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
        "--device-batch-size", "2", "--device-type", "cpu")
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
             "--device-batch-size", "2", "--device-type", "cpu"]
    r = subprocess.run([sys.executable, "-m", *again], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "(steps 4): --overwrite replaces them" in lines[0], r.stderr
    run(*again, "--overwrite")
    assert find_last_step(str(ckpt)) == 2
    # SFT continued from its own checkpoint (--source sft, the same tag): the step it starts from stays until the new
    # one is saved (it was removed before training: a run stopped early left no model at all)
    more = ["scripts.chat_sft", "--source", "sft", "--overwrite", "--eval-every", "-1", "--eval-steps", "1",
            "--device-batch-size", "2", "--device-type", "cpu"]
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
