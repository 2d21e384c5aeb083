import os
import json

import pytest
import torch

from nanochat.common import UserError
from conftest import each_flipped, save_without_digest, stdlib_texts
from nanochat.gpt import GPT, GPTConfig
from nanochat.checkpoint_manager import save_checkpoint, load_checkpoint, load_model, find_last_step


def save_tiny(base, tag, vocab_size=512, step=5, **meta):
    config = GPTConfig(sequence_len=64, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model = GPT(config)
    model.init_weights()
    ckpt = base / "base_checkpoints" / tag
    save_checkpoint(str(ckpt), step, model.state_dict(), {"optimizers": []}, {"step": step, "model_config": config.to_dict(), **meta})
    return model, ckpt


def test_round_trip_same_logits_and_no_temp_files(base_dir):
    model, ckpt = save_tiny(base_dir, "rt")
    assert sorted(os.listdir(ckpt)) == ["meta_000005.json", "model_000005.pt", "model_000005.pt.sha256", "optim_000005_rank0.pt",
                                        "optim_000005_rank0.pt.sha256"]
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


def test_a_tokenizer_retrained_at_the_same_vocab_size_is_refused(base_dir, tmp_path, monkeypatch):
    """Only the vocab size was checked: a tokenizer retrained on other text (same size) turned the model's ids
    into other text, silently. Checkpoints record the tokenizer's fingerprint; upstream's (none) load as before."""
    import shutil
    from nanochat.tokenizer import RustBPETokenizer, get_tokenizer
    tokenizer = get_tokenizer()
    save_tiny(base_dir, "fp", tokenizer_fingerprint=tokenizer.fingerprint())
    save_tiny(base_dir, "fp_upstream")
    assert load_model("base", "cpu", phase="eval", model_tag="fp")[2]["tokenizer_fingerprint"] == tokenizer.fingerprint()
    other = tmp_path / "other"
    shutil.copytree(base_dir / "base_checkpoints", other / "base_checkpoints")
    texts = stdlib_texts()
    retrained = RustBPETokenizer.train_from_iterator(iter(texts[:len(texts) // 4]), 512)  # other text, same size
    assert retrained.get_vocab_size() == 512 and retrained.fingerprint() != tokenizer.fingerprint()
    retrained.save(str(other / "tokenizer"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(other))
    with pytest.raises(UserError, match="trained with another tokenizer") as e:
        load_model("base", "cpu", phase="eval", model_tag="fp")
    assert "\n" not in str(e.value)
    load_model("base", "cpu", phase="eval", model_tag="fp_upstream")  # no fingerprint: not checked


def test_corrupt_files_are_user_errors(base_dir):
    _, ckpt = save_tiny(base_dir, "corrupt")
    data = (ckpt / "model_000005.pt").read_bytes()
    (ckpt / "model_000005.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="does not match its checksum"):
        load_model("base", "cpu", phase="eval", model_tag="corrupt")
    os.remove(ckpt / "model_000005.pt.sha256")  # as an upstream checkpoint: torch.load finds the damage
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
    _, ckpt = save_tiny(base_dir, "ints")
    weights = torch.load(ckpt / "model_000005.pt")
    weights["lm_head.weight"] = weights["lm_head.weight"].long()  # a foreign file of the right shapes
    save_without_digest(weights, ckpt / "model_000005.pt")
    with pytest.raises(UserError, match=r"not a model's weights: lm_head.weight holds torch.int64 values$"):
        load_model("base", "cpu", phase="eval", model_tag="ints")


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


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["model_config"].update(n_layers=2), "model_config.n_layers is not a model setting"),
    (lambda m: m["model_config"].update(n_layer="2"), "model_config.n_layer must be a positive integer, got '2'"),
    (lambda m: m["model_config"].update(n_head=True), "model_config.n_head must be a positive integer, got True"),
    (lambda m: m["model_config"].update(n_embd=-64), "model_config.n_embd must be a positive integer"),
    (lambda m: m["model_config"].update(window_pattern=["S"]), "window_pattern must be a string of S and L"),
    (lambda m: m.update(model_config=[1, 2]), "model_config missing or not a JSON object"),
    (lambda m: m.pop("model_config"), "model_config missing or not a JSON object"),
    (lambda m: m["model_config"].update(sequence_len=10 ** 12), "sequence_len 1,000,000,000,000 is above 65,536"),
    (lambda m: m["model_config"].update(n_kv_head=3), "n_head a multiple of n_kv_head"),
    (lambda m: m["model_config"].update(vocab_size=10 ** 12), "vocab_size 1,000,000,000,000 is above 16,777,216"),
    (lambda m: m["model_config"].update(n_layer=10 ** 15), "n_layer 1,000,000,000,000,000 is above 1,024"),
    # a meta claiming a 10M-token vocabulary is refused before anything that size is allocated
    (lambda m: m["model_config"].update(vocab_size=10 ** 7), r"does not match its model_config: lm_head.weight is \(512, 64\) in the weights, \(10000000, 64\)"),
])
def test_a_damaged_meta_is_one_line_naming_the_file_and_field(base_dir, edit, message):
    _, ckpt = save_tiny(base_dir, "damaged_meta")
    meta = json.loads((ckpt / "meta_000005.json").read_text())
    edit(meta)
    (ckpt / "meta_000005.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=message) as e:
        load_model("base", "cpu", phase="eval", model_tag="damaged_meta")
    assert "\n" not in str(e.value) and ("meta_000005.json" in str(e.value) or "does not match" in str(e.value))


def test_weights_that_are_not_a_state_dict_or_not_finite_are_refused(base_dir):
    model, ckpt = save_tiny(base_dir, "w")
    save_without_digest([1, 2, 3], ckpt / "model_000005.pt")
    with pytest.raises(UserError, match="model_000005.pt: expected a state_dict of named tensors, got list"):
        load_model("base", "cpu", phase="eval", model_tag="w")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["transformer.h.1.attn.c_q.weight"][3, 5] = float("nan")
    save_without_digest(state, ckpt / "model_000005.pt")
    with pytest.raises(UserError, match=r"model_000005.pt: transformer.h.1.attn.c_q.weight holds NaN or inf"):
        load_model("base", "cpu", phase="eval", model_tag="w")
    save_without_digest(model.state_dict(), ckpt / "model_000005.pt")
    (ckpt / "meta_000005.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="meta_000005.json: expected a JSON object, got list"):
        load_model("base", "cpu", phase="eval", model_tag="w")


def test_a_pickle_that_is_not_plain_tensors_is_refused_in_one_line(base_dir):
    import pickle
    _, ckpt = save_tiny(base_dir, "evil")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > pwned.txt",))
    with open(ckpt / "model_000005.pt", "wb") as f:
        pickle.dump({"w": Evil()}, f)
    from nanochat.common import file_sha256
    with open(ckpt / "model_000005.pt.sha256", "w") as f:  # an attacker writes a digest that matches
        f.write(f"{file_sha256(ckpt / 'model_000005.pt')}  model_000005.pt\n")
    with pytest.raises(UserError, match="cannot read checkpoint file .*model_000005.pt: UnpicklingError") as e:
        load_model("base", "cpu", phase="eval", model_tag="evil")
    assert "\n" not in str(e.value) and len(str(e.value)) < 400 and not os.path.exists("pwned.txt")


def test_a_first_save_that_was_interrupted_says_so(tmp_path):
    (tmp_path / "model_000003.pt.a1b2c3d4.tmp").write_bytes(b"partial")
    with pytest.raises(UserError, match=r"no complete checkpoint .* \(a save was interrupted: model_000003.pt.a1b2c3d4.tmp; train again\)"):
        find_last_step(str(tmp_path))


def test_fuzz_every_model_config_field_of_every_type_is_refused_in_one_line(base_dir):
    """Each model_config field missing or replaced by a value of another type or range: a one-line
    error naming the meta file or the mismatch, or (a missing field equal to its default) the same model."""
    model, ckpt = save_tiny(base_dir, "fuzz")
    path = ckpt / "meta_000005.json"
    meta = json.loads(path.read_text())
    ids = torch.randint(0, 512, (1, 12))
    loaded_some = []
    for field in meta["model_config"]:
        for value in [None, True, 0, -3, 2.5, 10 ** 15, "8", "", [], {}, "SXL", "<missing>"]:
            bad = json.loads(json.dumps(meta))
            if value == "<missing>":
                bad["model_config"].pop(field)
            else:
                bad["model_config"][field] = value
            path.write_text(json.dumps(bad))
            try:
                loaded, _, _ = load_model("base", "cpu", phase="eval", model_tag="fuzz")
            except UserError as e:
                assert "\n" not in str(e) and ("meta_000005.json" in str(e) or "does not match" in str(e)), str(e)
                continue
            assert torch.equal(loaded(ids), model(ids)), (field, value)
            loaded_some.append((field, value))
    # defaults that compute the same here: SSSL (windows wider than these 12 tokens), a 2048 sequence_len
    assert set(loaded_some) <= {("window_pattern", "<missing>"), ("sequence_len", "<missing>")}


def test_a_changed_byte_in_a_weights_file_is_refused_by_its_digest(base_dir):
    """torch.load does not check its zip's CRCs: flipped bytes in tensor data load as other weights.
    The .sha256 beside each file catches them; a file without one (upstream's) loads unchecked."""
    import random
    import subprocess
    _, ckpt = save_tiny(base_dir, "flip")
    model_file = ckpt / "model_000005.pt"
    assert subprocess.run(["sha256sum", "-c", "model_000005.pt.sha256"], cwd=ckpt, capture_output=True).returncode == 0
    random.seed(0)
    for _ in each_flipped(model_file, random.sample(range(model_file.stat().st_size), 40)):
        with pytest.raises(UserError, match="model_000005.pt does not match its checksum in model_000005.pt.sha256") as e:
            load_model("base", "cpu", phase="eval", model_tag="flip")
        assert "\n" not in str(e.value)
    os.remove(str(model_file) + ".sha256")
    load_model("base", "cpu", phase="eval", model_tag="flip")  # no digest: read unchecked


def test_under_ddp_the_meta_waits_for_every_ranks_optimizer_file(tmp_path, monkeypatch):
    """Rank 0 wrote the meta (the mark of a complete step) while other ranks could still be writing theirs."""
    import nanochat.checkpoint_manager as cm
    order = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: order.append("barrier"))
    monkeypatch.setattr(cm, "atomic_torch_save", lambda obj, path: order.append(os.path.basename(path)))
    monkeypatch.setattr(cm, "atomic_write_json", lambda obj, path: order.append(os.path.basename(path)))
    save_checkpoint(str(tmp_path), 3, {}, {"optimizers": []}, {"step": 3}, rank=0)
    assert order == ["barrier", "optim_000003_rank0.pt", "barrier", "model_000003.pt", "meta_000003.json"]
    order.clear()
    save_checkpoint(str(tmp_path), 3, {}, {"optimizers": []}, {"step": 3}, rank=1)
    assert order == ["barrier", "optim_000003_rank1.pt", "barrier"]


def test_a_save_killed_over_an_existing_step_leaves_it_incomplete_not_mixed(base_dir, monkeypatch):
    """A run saving over a step an earlier run left (--overwrite, or chat_sft --source sft) and killed between
    the weights and the meta: the old meta marked the new weights complete (another model's config: a shape
    error at load, or at the same size a silent mix). The old meta now goes first."""
    import nanochat.checkpoint_manager as cm
    _, ckpt = save_tiny(base_dir, "mixed", step=2)
    save_tiny(base_dir, "mixed", step=1)
    write_json = cm.atomic_write_json

    def killed(obj, path):
        raise KeyboardInterrupt
    monkeypatch.setattr(cm, "atomic_write_json", killed)
    config = GPTConfig(sequence_len=64, vocab_size=512, n_layer=1, n_head=2, n_kv_head=2, n_embd=32)  # another model
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(ckpt), 2, GPT(config).state_dict(), {"optimizers": []}, {"step": 2, "model_config": config.to_dict()})
    monkeypatch.setattr(cm, "atomic_write_json", write_json)
    assert find_last_step(str(ckpt)) == 1  # step 2 is incomplete: skipped
    _, _, meta = load_model("base", "cpu", phase="eval", model_tag="mixed")
    assert meta["step"] == 1
