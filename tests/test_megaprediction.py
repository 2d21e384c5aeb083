"""MegaPrediction readouts (nanochat/megacontext/megaprediction.py), against the real GPT and GistNet."""

import os
import json
import math

import pytest
import torch

from nanochat.common import UserError
from nanochat.megacontext.config import MegaContextConfig
from nanochat.megacontext.gistnet import GistNet
from nanochat.megacontext.horizon import SequenceSource, build_source, horizon_nll
from nanochat.megacontext.megaprediction import MegaPredictor, megaprediction_loss, predicted_gist_dnll, readout_slots
from nanochat.megacontext.working_context import WorkingContext
from scripts import base_train
from test_base_train import MC_TINY
from test_horizon import tiny_model


def make_gistnet():
    torch.manual_seed(1)
    gistnet = GistNet(64, kind="mlp", max_level=2)
    with torch.no_grad():  # not just the normalized mean of the block
        gistnet.encoders[0].head.c_proj.weight.normal_(std=0.05)
    return gistnet


def test_readout_slots_are_the_last_token_of_a_block_before_a_whole_next_block():
    assert list(readout_slots(64, 1)) == [31]
    assert list(readout_slots(96, 1)) == [31, 63]
    assert list(readout_slots(95, 1)) == [31]  # [64, 96) is not inside a 95-token row
    assert list(readout_slots(63, 1)) == [] and list(readout_slots(31, 1)) == []
    assert list(readout_slots(2048, 2)) == [1023] and list(readout_slots(2047, 2)) == []
    for T in range(1, 130):
        slots = list(readout_slots(T, 1))
        assert slots == [t for t in range(T) if (t + 1) % 32 == 0 and t + 1 + 32 <= T]
    # the real GPT: the hidden state at t = 31 has read the block [0, 32) and nothing of [32, 64)
    model = tiny_model()
    ids = torch.randint(0, 97, (1, 96), generator=torch.Generator().manual_seed(0))
    t = readout_slots(96, 1)[0]

    def hidden_at_t(x):
        with torch.no_grad():
            return model(x, return_hidden=True)[1][0, t]

    h = hidden_at_t(ids)
    later, last, first = ids.clone(), ids.clone(), ids.clone()
    later[0, t + 1:] = (later[0, t + 1:] + 1) % 97
    last[0, t] = (last[0, t] + 1) % 97
    first[0, 0] = (first[0, 0] + 1) % 97
    torch.testing.assert_close(hidden_at_t(later), h, rtol=0, atol=1e-6)
    assert not torch.allclose(hidden_at_t(last), h, atol=1e-4)
    assert not torch.allclose(hidden_at_t(first), h, atol=1e-4)


def test_loss_is_zero_on_the_true_next_gists_and_trains_the_readout_and_the_model_not_gistnet():
    model, gistnet = tiny_model(), make_gistnet()
    ids = torch.randint(0, 97, (2, 96), generator=torch.Generator().manual_seed(1))
    oracle = MegaPredictor(64, 2)
    with torch.no_grad():
        oracle.head.weight.copy_(torch.eye(64))  # pred = norm(hidden): a hidden state that is a gist predicts itself
        nxt, cur = torch.randn(2, 96, 64), torch.randn(2, 96, 64)
        for b in range(2):
            for t in readout_slots(96, 1):  # the next block's gist, and the gist of the block just read
                nxt[b, t] = gistnet(model.embed_tokens(ids[b, t + 1:t + 33])[None], 1)[0]
                cur[b, t] = gistnet(model.embed_tokens(ids[b, t - 31:t + 1])[None], 1)[0]
        losses, cos = megaprediction_loss(oracle, gistnet, model, nxt, ids, [1, 2])
        assert set(losses) == {1} and set(cos) == {1}  # no whole LOD2 block after a 1024-token one in 96 tokens
        assert losses[1].item() < 1e-5 and cos[1] > 1 - 1e-5
        assert megaprediction_loss(oracle, gistnet, model, cur, ids, [1])[0][1].item() > 1e-2  # the current block is not the target

    predictor = MegaPredictor(64, 2)  # the real init, on the real hidden states: gradients from step 0
    _, hidden = model(ids, return_hidden=True)
    losses, cos = megaprediction_loss(predictor, gistnet, model, hidden, ids, [1])
    losses[1].backward()
    assert predictor.head.weight.grad.abs().sum() > 0 and predictor.level_bias.grad[0].abs().sum() > 0
    assert predictor.level_gain.grad[0].abs().sum() > 0 and predictor.level_bias.grad[1].abs().sum() == 0  # LOD2 untouched
    assert model.transformer.h[0].attn.c_q.weight.grad.abs().sum() > 0 and model.transformer.wte.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in gistnet.parameters())  # the targets are fixed


def test_a_few_steps_on_a_fixed_batch_raise_the_cosine():
    model, gistnet = tiny_model(), make_gistnet()
    predictor = MegaPredictor(64, 1)
    ids = torch.randint(0, 97, (2, 160), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW(list(predictor.parameters()) + list(model.parameters()), lr=1e-2)
    history = []
    for _ in range(15):
        _, hidden = model(ids, return_hidden=True)
        losses, cos = megaprediction_loss(predictor, gistnet, model, hidden, ids, [1])
        history.append(cos[1])
        opt.zero_grad()
        losses[1].backward()
        opt.step()
    assert history[-1] > history[0] + 0.2, history


def test_predicted_gist_dnll_equals_a_hand_built_substitution():
    model, gistnet = tiny_model(), make_gistnet()
    with torch.no_grad():  # attention strong enough that one slot's gist moves the horizon NLL
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(std=0.5)
    predictor = MegaPredictor(64, 2)
    cfg = MegaContextConfig(w_max=64, max_level=2, recent_tokens=32, horizon=32)
    H, n = 32, 2200  # a history with a level-2 gist after token 0: [1024, 2048)
    rows = torch.randint(0, 97, (2, n + H), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = predicted_gist_dnll(predictor, gistnet, model, cfg, rows)
        deltas = {1: [], 2: []}
        for row in rows:
            history, horizon = row[:n], row[n:]
            src = build_source(model, gistnet, history, 2)
            wc = WorkingContext.recency_filled(src, 64, 32, 2)
            assert wc.cost <= 64
            _, hidden = model(history[None], return_hidden=True)  # (1, n, C)
            true = horizon_nll(model, [wc], [src], [horizon]).mean().item()
            for L in (1, 2):
                e = [e for e in wc.entries if e.level == L][-1]  # the newest level-L gist
                assert e.start == {1: 2112, 2: 1024}[L]
                levels = list(src.levels)
                levels[L] = levels[L].clone()
                levels[L][e.start // 32 ** L] = predictor(hidden[0, e.start - 1], L)
                swapped = horizon_nll(model, [wc], [SequenceSource(history, levels)], [horizon]).mean().item()
                deltas[L].append(swapped - true)
    assert set(got) == {1, 2}
    for L in (1, 2):
        assert abs(got[L]) > 1e-3  # a random readout's gist is not the true one
        assert got[L] == pytest.approx(sum(deltas[L]) / 2, rel=1e-3, abs=1e-6)


def test_base_train_megaprediction_end_to_end_logs_saves_and_resumes_bitwise(base_dir):
    with pytest.raises(UserError, match="--megaprediction needs --megacontext"):
        base_train.parse_args(["--megaprediction"])
    common = MC_TINY + ["--megaprediction", "--num-iterations", "4", "--eval-every", "4", "--mc-eval-rows", "4"]
    first = base_train.main(common + ["--model-tag", "mp", "--save-every", "2"])
    ckpt = base_dir / "base_checkpoints" / "mp"
    records = [json.loads(line) for line in (ckpt / "train_log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert all(0 < abs(r["mc/mp_cos_lod1"]) < 1 for r in train) and "mc/mp_cos_lod2" not in train[-1]  # no LOD2 readout in 128 tokens
    assert [r["step"] for r in evals] == [0, 4] and all(math.isfinite(r["mc_val/mp_dnll_lod1"]) for r in evals)

    from nanochat.checkpoint_manager import build_model
    from nanochat.megacontext.checkpoint import load_megacontext, load_predictor
    model, _, meta = build_model(str(ckpt), 4, "cpu", "eval")
    assert meta["megacontext"]["megaprediction"] is True
    predictor = load_predictor(str(ckpt), 4, model.config, "cpu")
    fresh = MegaPredictor(model.config.n_embd, 1)
    assert isinstance(predictor, MegaPredictor) and not torch.equal(predictor.head.weight, fresh.head.weight)
    assert not torch.equal(predictor.level_bias, fresh.level_bias)  # trained, not its init
    assert len(load_megacontext(str(ckpt), 4, model.config, "cpu")[3]["param_groups"]) == 3  # GistNet, LensNet, predictor

    # resume from step 2: the same final loss, model and predictor, bitwise
    saved = {name: torch.load(ckpt / name) for name in ("model_000004.pt", "mc_000004.pt")}
    for f in ("model_000004.pt", "meta_000004.json", "optim_000004_rank0.pt", "mc_000004.pt"):
        os.remove(ckpt / f)
    resumed = base_train.main(common + ["--model-tag", "mp", "--resume-from-step", "2"])
    assert resumed["final_loss"] == first["final_loss"] and resumed["val_bpb"] == first["val_bpb"]
    a, b = saved["model_000004.pt"], torch.load(ckpt / "model_000004.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    a, b = saved["mc_000004.pt"]["predictor"], torch.load(ckpt / "mc_000004.pt")["predictor"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the same run without --megaprediction: the same first LM loss (same init, same forward), no mp keys
    base_train.main(MC_TINY + ["--num-iterations", "1", "--eval-every", "-1", "--model-tag", "mp_off"])
    off = [json.loads(line) for line in (base_dir / "base_checkpoints" / "mp_off" / "train_log.jsonl").read_text().splitlines()]
    assert off[0]["loss"] == train[0]["loss"] and not any(k.startswith("mc/mp_") for k in off[0])
    assert load_predictor(str(base_dir / "base_checkpoints" / "mp_off"), 1, model.config, "cpu") is None
