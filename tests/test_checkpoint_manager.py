import os
import json

import pytest
import torch

from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig
from nanochat.checkpoint_manager import save_checkpoint, load_checkpoint, load_model, find_last_step


def save_tiny(base, tag, vocab_size=512, step=5):
    config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model = GPT(config)
    model.init_weights()
    ckpt = base / "base_checkpoints" / tag
    save_checkpoint(str(ckpt), step, model.state_dict(), {"optimizers": []}, {"step": step, "model_config": config.to_dict()})
    return model, ckpt


def test_round_trip_same_logits_and_no_temp_files(base_dir):
    model, ckpt = save_tiny(base_dir, "rt")
    assert sorted(os.listdir(ckpt)) == ["meta_000005.json", "model_000005.pt", "optim_000005_rank0.pt"]
    loaded, tokenizer, meta = load_model("base", "cpu", phase="eval", model_tag="rt")
    ids = torch.randint(0, 512, (1, 20))
    assert torch.equal(model(ids), loaded(ids)) and not loaded.training
    assert meta["step"] == 5 and tokenizer.get_vocab_size() == 512
    _, optim, _ = load_checkpoint(str(ckpt), 5, "cpu", load_optimizer=True)
    assert optim == {"optimizers": []}


def test_vocab_mismatch_is_a_user_error(base_dir):
    save_tiny(base_dir, "vocab", vocab_size=300)
    with pytest.raises(UserError, match="vocab mismatch"):
        load_model("base", "cpu", phase="eval", model_tag="vocab")


def test_corrupt_files_are_user_errors(base_dir):
    _, ckpt = save_tiny(base_dir, "corrupt")
    data = (ckpt / "model_000005.pt").read_bytes()
    (ckpt / "model_000005.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_model("base", "cpu", phase="eval", model_tag="corrupt")
    _, ckpt = save_tiny(base_dir, "badmeta")
    (ckpt / "meta_000005.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt checkpoint meta"):
        load_model("base", "cpu", phase="eval", model_tag="badmeta")


def test_wrong_shapes_are_user_errors(base_dir):
    _, ckpt = save_tiny(base_dir, "shapes")
    meta = json.loads((ckpt / "meta_000005.json").read_text())
    meta["model_config"]["n_embd"] = 128
    (ckpt / "meta_000005.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not match its model_config"):
        load_model("base", "cpu", phase="eval", model_tag="shapes")


def test_missing_things_are_user_errors(base_dir, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="unknown checkpoint source"):
        load_model("nope", "cpu", phase="eval")
    with pytest.raises(UserError, match="no complete checkpoint"):
        find_last_step(str(tmp_path))
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(str(tmp_path), 1, "cpu")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError, match="train a model first"):
        load_model("sft", "cpu", phase="eval")


def test_incomplete_newest_step_is_skipped(base_dir):
    _, ckpt = save_tiny(base_dir, "partial", step=5)
    (ckpt / "model_000009.pt").write_bytes((ckpt / "model_000005.pt").read_bytes())  # crashed before its meta
    assert find_last_step(str(ckpt)) == 5
    _, _, meta = load_model("base", "cpu", phase="eval", model_tag="partial")
    assert meta["step"] == 5
