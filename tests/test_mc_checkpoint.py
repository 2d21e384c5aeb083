"""GistNet + LensNet beside a base checkpoint (nanochat/megacontext/checkpoint.py)."""

import dataclasses

import pytest
import torch

from nanochat.common import UserError
from nanochat.gpt import GPTConfig
from nanochat.megacontext.checkpoint import build_modules, build_predictor, load_megacontext, load_predictor, mc_path, save_megacontext
from nanochat.megacontext.config import MegaContextConfig
from conftest import jitter

MODEL = GPTConfig(sequence_len=256, vocab_size=97, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
MC = MegaContextConfig(w_max=128, max_level=2, gist_layers=1, lens_layers=1, lens_hidden=32, lens_tail=3)


def test_save_and_load_round_trip_weights_config_and_optimizer(tmp_path):
    gistnet, lensnet = build_modules(MC, MODEL)
    jitter(list(gistnet.parameters()) + list(lensnet.parameters()), 1.0)
    opt = torch.optim.AdamW(list(gistnet.parameters()) + list(lensnet.parameters()))
    sum(p.sum() for p in gistnet.parameters()).backward()
    opt.step()
    save_megacontext(str(tmp_path), 7, MC, gistnet, lensnet, opt)
    mc, g2, l2, state = load_megacontext(str(tmp_path), 7, MODEL, "cpu")
    assert mc == MC and state["param_groups"][0]["lr"] == opt.param_groups[0]["lr"]
    for a, b in ((gistnet, g2), (lensnet, l2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert l2.n_tail == 3 and g2.max_level == 2 and l2.max_level == 2  # built from the saved config


def test_missing_truncated_or_foreign_files_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="no MegaContext weights"):
        load_megacontext(str(tmp_path), 1, MODEL, "cpu")
    gistnet, lensnet = build_modules(MC, MODEL)
    save_megacontext(str(tmp_path), 1, MC, gistnet, lensnet)
    data = open(mc_path(str(tmp_path), 1), "rb").read()
    open(mc_path(str(tmp_path), 2), "wb").write(data[:len(data) // 2])
    with pytest.raises(UserError, match="cannot read MegaContext weights .*mc_000002.pt: RuntimeError") as e:
        load_megacontext(str(tmp_path), 2, MODEL, "cpu")
    assert "\n" not in str(e.value)
    data = torch.load(mc_path(str(tmp_path), 1), weights_only=True)
    data["lensnet"][next(iter(data["lensnet"]))].view(-1)[0] = float("inf")
    torch.save(data, mc_path(str(tmp_path), 3))
    with pytest.raises(UserError, match=r"mc_000003.pt lensnet: \S+ holds NaN or inf"):
        load_megacontext(str(tmp_path), 3, MODEL, "cpu")
    torch.save(["not", "a", "dict"], mc_path(str(tmp_path), 4))
    with pytest.raises(UserError, match="cannot load MegaContext weights .*mc_000004.pt: TypeError"):
        load_megacontext(str(tmp_path), 4, MODEL, "cpu")
    for field, value in [("w_max", "128"), ("horizon", 1.5), ("gist_shared", 1), ("lens_lr", float("nan")), ("n_diff", 10 ** 9)]:
        data = torch.load(mc_path(str(tmp_path), 1), weights_only=True)
        data["mc_config"][field] = value
        torch.save(data, mc_path(str(tmp_path), 5))
        with pytest.raises(UserError, match=rf"mc_000005.pt: mc_config: mc_{field} (must be|.* is above)") as e:
            load_megacontext(str(tmp_path), 5, MODEL, "cpu")
        assert "\n" not in str(e.value)
    other = GPTConfig(sequence_len=256, vocab_size=97, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    with pytest.raises(UserError, match="cannot load MegaContext weights"):
        load_megacontext(str(tmp_path), 1, other, "cpu")  # weights of a 64-wide model into a 128-wide one


def test_megapredictor_round_trips_beside_gistnet_and_lensnet_and_is_none_when_off(tmp_path):
    gistnet, lensnet = build_modules(MC, MODEL)
    assert build_predictor(MC, MODEL) is None
    save_megacontext(str(tmp_path), 1, MC, gistnet, lensnet)
    assert load_predictor(str(tmp_path), 1, MODEL, "cpu") is None  # a run without --megaprediction
    mp = dataclasses.replace(MC, megaprediction=True)
    predictor = build_predictor(mp, MODEL)
    jitter(predictor.parameters(), 1.0)
    save_megacontext(str(tmp_path), 2, mp, gistnet, lensnet, predictor=predictor)
    p2 = load_predictor(str(tmp_path), 2, MODEL, "cpu")
    sa, sb = predictor.state_dict(), p2.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) and p2.max_level == 2
    assert load_megacontext(str(tmp_path), 2, MODEL, "cpu")[0] == mp  # the GistNet + LensNet loader is unchanged
    data = open(mc_path(str(tmp_path), 2), "rb").read()
    open(mc_path(str(tmp_path), 3), "wb").write(data[:len(data) // 2])
    with pytest.raises(UserError, match="cannot read MegaContext weights .*mc_000003.pt") as e:
        load_predictor(str(tmp_path), 3, MODEL, "cpu")
    assert "\n" not in str(e.value)
    other = GPTConfig(sequence_len=256, vocab_size=97, n_layer=2, n_head=2, n_kv_head=2, n_embd=128)
    with pytest.raises(UserError, match="cannot load MegaPrediction weights"):
        load_predictor(str(tmp_path), 2, other, "cpu")
    with pytest.raises(UserError, match="no MegaContext weights"):
        load_predictor(str(tmp_path), 9, MODEL, "cpu")


def test_chat_models_get_the_megacontext_weights_of_the_base_step_they_were_tuned_from(tmp_path, monkeypatch):
    """An SFT (or RL on SFT) model reads mc_<step>.pt of the base step its meta names, never the newest:
    mc_6.pt of a base save killed before its model and meta must not pair with a model tuned from step 5."""
    import json
    from nanochat.megacontext.checkpoint import find_megacontext
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    base, sft, rl = (tmp_path / d / "d4" for d in ("base_checkpoints", "chatsft_checkpoints", "chatrl_checkpoints"))
    for d in (base, sft, rl):
        d.mkdir(parents=True)
    gistnet, lensnet = build_modules(MC, MODEL)
    for step in (5, 6):
        save_megacontext(str(base), step, MC, gistnet, lensnet)
    (base / "meta_000005.json").write_text(json.dumps(dict(step=5)))
    (sft / "meta_000200.json").write_text(json.dumps(dict(source=dict(kind="base", model_tag="d4", step=5))))
    (rl / "meta_000030.json").write_text(json.dumps(dict(source=dict(kind="sft", step=200))))
    assert find_megacontext("base", "d4", 5) == (str(base), 5)
    assert find_megacontext("sft", "d4", 200) == (str(base), 5)
    assert find_megacontext("rl", "d4", 30) == (str(base), 5)
    (sft / "meta_000300.json").write_text(json.dumps(dict(source=dict(kind="base", model_tag="d4", step=4))))
    with pytest.raises(UserError, match="no MegaContext weights saved with this checkpoint"):
        find_megacontext("sft", "d4", 300)  # its base step has none: refused, not mc_6
    (sft / "meta_000400.json").write_text(json.dumps(dict(source=dict(kind="base", step="five"))))
    with pytest.raises(UserError, match="unreadable source"):
        find_megacontext("sft", "d4", 400)
