"""MegaContext runtime (nanochat/megacontext/runtime.py): streaming decode over a WC with a reused KV cache."""

import base64
import json
import numpy as np
import os
import re
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from nanochat.megacontext.positions import slot_rotary
from nanochat.common import UserError, json_checksum
from nanochat.gpt import GPT, GPTConfig, norm
from nanochat.megacontext.checkpoint import build_modules
from nanochat.megacontext.config import MegaContextConfig
from nanochat.megacontext.runtime import Session, format_focus, make_room
from nanochat.megacontext.slots import Plan, slot_items
from nanochat.megacontext.working_context import Entry, WorkingContext, check_working_context
from conftest import jitter

K = 32
VOCAB = 256


def parts(seed=0, lens_tau=0.0, w_max=128, recent=16, allocator="greedy"):
    """A tiny GPT with every term active, and a random GistNet / LensNet (LensNet thresholds at 0, so
    its random scores make real edits at every refocus)."""
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=512, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=1, n_embd=64, window_pattern="SL")
    model = GPT(config)
    model.init_weights()
    jitter(model.parameters(), 0.02)
    mc = MegaContextConfig(w_max=w_max, max_level=1, recent_tokens=recent, gist_kind="mlp", gist_pooling="mean",
                           lens_layers=1, lens_hidden=32, tau_expand=lens_tau, tau_collapse=lens_tau, cooldown=1,
                           allocator=allocator).validate()
    gistnet, lensnet = build_modules(mc, config)
    jitter(list(gistnet.parameters()) + list(lensnet.parameters()), 0.05)
    return model.eval(), gistnet, lensnet, mc


def full_forward_logits(session):
    """The logits at the last slot from one forward of the whole current layout (no cache)."""
    items = slot_items(session.wc, None if session.plan is None else session.plan[0])
    b = session.slots.assemble_from(items, 0, session.source, None if session.plan is None else session.plan[1])
    with torch.no_grad():
        return session.model(b["idx"], inputs_embeds=b["embeds"], rotary=slot_rotary(session.model, b["positions"], b["lod"]), lod=b["lod"])[0, -1]


def stream(n, seed=1):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_streaming_keeps_the_wc_legal_in_budget_and_the_cache_equal_to_a_full_forward():
    model, gistnet, lensnet, mc = parts()
    s = Session.create(model, gistnet, lensnet, mc)
    tokens = stream(900)
    s.feed(tokens[:40])  # a prompt, then token by token: every refocus edits (random LensNet, tau 0)
    for i, t in enumerate(tokens[40:]):
        logits = s.feed([t])
        check_working_context(s.wc, s.tree, mc.w_max, mc.recent_tokens)
        if i % 37 == 0 or i > len(tokens) - 45:
            assert torch.allclose(logits, full_forward_logits(s), atol=1e-4), f"cache diverged at token {40 + i}"
    assert s.stats["edits"] > 10  # LensNet's edits were really applied and recomputed
    # failure mode 7: far past w_max, the whole history stays reachable through gists, deeper than trained
    assert s.wc.start == 0 and s.tree.num_tokens == 900 and s.wc.cost <= mc.w_max
    assert len(s.tree.levels) - 1 == 1 and s.focus()["unreachable_tokens"] == 0
    # between refocuses a token costs one slot; refocuses at most a WC each, once per block
    assert s.stats["slots_computed"] <= len(tokens) + (len(tokens) // K + 1) * mc.w_max


def test_refocus_runs_every_block_and_only_recomputes_from_the_first_edit():
    model, gistnet, lensnet, mc = parts(lens_tau=2.0)  # tau out of tanh's reach: no LensNet edit, only make_room
    s = Session.create(model, gistnet, lensnet, mc)
    s.feed(stream(64))
    r0, slots0 = s.stats["refocuses"], s.stats["slots_computed"]
    for t in stream(31, seed=3):  # inside one block: no refocus, one slot each
        s.feed([t])
    assert s.stats["refocuses"] == r0 and s.stats["slots_computed"] == slots0 + 31
    s.feed([5])  # the block completes: a refocus
    assert s.stats["refocuses"] == r0 + 1


def test_a_long_history_builds_levels_past_the_trained_depth_and_stays_reachable():
    model, gistnet, lensnet, mc = parts(w_max=160, recent=16)
    s = Session.create(model, gistnet, lensnet, mc)
    s.feed(stream(40 * 1024 + 17))  # 40k tokens: LOD1 and LOD2 gists with a GistNet trained to LOD1
    assert len(s.tree.levels) - 1 == 3 and s.tree.num_gists(2) == 40
    assert s.wc.start == 0 and any(e.level >= 2 for e in s.wc.entries) and s.wc.cost <= 160 - K
    for t in stream(70, seed=4):
        logits = s.feed([t])
    assert torch.allclose(logits, full_forward_logits(s), atol=1e-4)
    assert s.focus()["lod"]["lod0"]["slots"] >= mc.recent_tokens


def test_make_room_collapses_the_oldest_first_and_protects_recent_tokens():
    model, gistnet, lensnet, mc = parts()
    s = Session.create(model, gistnet, None, mc)
    s.feed(stream(300))
    raw = WorkingContext.recent(s.tree, 300)  # every token raw: cost 300
    out = make_room(raw, s.tree, 120, recent_tokens=40)
    assert out.cost <= 120 and out.start == 0
    levels = [e.level for e in out.entries]
    assert levels == sorted(levels, reverse=True)  # coarse old, raw new
    assert all(e.level == 0 for e in out.entries if e.end > 300 - 40)
    assert make_room(raw, s.tree, 300, 40) == raw


class FixedPredictor(nn.Module):
    """A predictor with the MegaPredictor call signature: a fixed projection of the hidden state."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, hidden, level):
        return norm(self.proj(hidden))


def test_gist_first_places_a_plan_before_each_block_and_removes_it_when_the_block_is_done():
    model, gistnet, lensnet, mc = parts()
    torch.manual_seed(0)
    s = Session.create(model, gistnet, lensnet, mc, predictor=FixedPredictor(64), gist_first=True)
    s.feed(stream(64))  # ends on a block boundary
    gen = s.generate(40, temperature=0.0)
    first, _ = next(gen)
    assert s.plan is not None and s.plan[0] == 64 and s.focus()["plan"] == 64
    items = slot_items(s.wc, 64)
    assert isinstance(items[-2], Plan) and items[-1] == Entry(0, 64, 65)
    assert torch.allclose(s.logits, full_forward_logits(s), atol=1e-4)  # the plan slot is in the cached prefix
    for _ in range(31):
        next(gen)
    assert s.tree.num_tokens == 96 and s.plan is None  # the block completed: the plan is gone
    next(gen)
    assert s.plan[0] == 96
    gen.close()  # generation stops mid-block: the plan leaves with it
    assert s.plan is None and torch.allclose(s.logits, full_forward_logits(s), atol=1e-4)
    with pytest.raises(UserError):
        Session.create(model, gistnet, lensnet, mc, gist_first=True)  # no predictor


def test_gist_first_and_token_first_both_decode_from_the_same_prompt():
    model, gistnet, lensnet, mc = parts()
    runs, logits = {}, {}
    for gist_first in (False, True):
        s = Session.create(model, gistnet, lensnet, mc, predictor=FixedPredictor(64), gist_first=gist_first)
        s.feed(stream(200))
        runs[gist_first] = [t for t, _ in s.generate(70, temperature=0.0)]
        s.feed([1, 2, 3])  # continue both with the same tokens, to compare their logits
        with torch.inference_mode():
            s.plan = (s.tree.num_tokens - 3, s.predictor(s.hidden[None], 1)[0]) if gist_first else None
            logits[gist_first] = s._sync().clone()
    assert all(len(r) == 70 and all(0 <= t < VOCAB for t in r) for r in runs.values())
    assert runs[False][:24] == runs[True][:24]  # the prompt ends 8 tokens into a block: no plan before token 224
    assert not torch.allclose(logits[False], logits[True], atol=1e-3)  # a plan changes what the model predicts


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_save_and_reopen_continues_exactly(tmp_path, temperature):
    model, gistnet, lensnet, mc = parts()
    prompt = stream(150)
    ref = Session.create(model, gistnet, lensnet, mc, seed=7)
    ref.feed(prompt)
    expected = [t for t, _ in ref.generate(60, temperature=temperature)]

    path = str(tmp_path / "session")
    s = Session.create(model, gistnet, lensnet, mc, path=path, seed=7)
    s.feed(prompt)
    head = [t for t, _ in s.generate(25, temperature=temperature)]
    s.save()
    wc, logits = s.wc, s.logits.clone()
    s.close()
    again = Session.open(path, model, gistnet, lensnet, mc)
    assert again.wc == wc and again.tree.num_tokens == 175
    assert torch.allclose(again.logits, logits, atol=1e-4)
    tail = [t for t, _ in again.generate(35, temperature=temperature)]
    assert head + tail == expected
    again.close()


def test_a_stochastic_allocator_draws_from_the_session_seed_and_a_reopened_session_continues_it(tmp_path):
    """Its draws came from torch's global RNG: two sessions of one seed focused differently, and a reopened one
    went on differently from the session it was saved from."""
    model, gistnet, lensnet, mc = parts(allocator="stochastic", w_max=512)
    prompt = stream(1200)
    torch.manual_seed(1)
    a = Session.create(model, gistnet, lensnet, mc, seed=3)
    a.feed(prompt[:700])
    a.feed(prompt[700:])
    torch.manual_seed(2)  # the global RNG does not steer it
    b = Session.create(model, gistnet, lensnet, mc, seed=3)
    b.feed(prompt[:700])
    b.feed(prompt[700:])
    assert a.wc == b.wc and a.stats["edits"] > 0
    path = str(tmp_path / "session")
    s = Session.create(model, gistnet, lensnet, mc, path=path, seed=3)
    s.feed(prompt[:700])
    s.save()
    s.close()
    torch.manual_seed(4)
    again = Session.open(path, model, gistnet, lensnet, mc)
    again.feed(prompt[700:])
    assert again.wc == a.wc
    again.close()


def test_the_session_refuses_a_wc_the_model_cannot_see_whole_and_ids_outside_its_vocabulary():
    model, gistnet, lensnet, mc = parts()  # sequence_len 512
    with pytest.raises(UserError, match="w_max 544 is more than the model attends to"):  # its oldest slots fell out of sight
        Session.create(model, gistnet, lensnet, mc, w_max=544)
    s = Session.create(model, gistnet, lensnet, mc)
    s.feed(stream(40))
    for bad in ([VOCAB], [5, -1]):  # an id past the vocabulary broke the session for good (the tree had taken it)
        with pytest.raises(UserError, match="not in the model's vocabulary"):
            s.feed(bad)
    assert s.tree.num_tokens == 40
    s.feed([1])
    assert s.tree.num_tokens == 41


def test_a_session_saved_on_another_kind_of_device_opens_and_samples_from_its_seed(tmp_path):
    """A CUDA generator's state is 16 bytes, a CPU one's 5056: a session saved on a GPU opens on a CPU (and
    the other way round) with its history and WC as saved; only the sampling starts again from the seed."""
    model, gistnet, lensnet, mc = parts()
    path = str(tmp_path / "session")
    s = Session.create(model, gistnet, lensnet, mc, path=path)
    s.feed(stream(150))
    s.save()
    wc = s.wc
    s.close()
    file = os.path.join(path, "session.json")
    with open(file) as f:
        state = json.load(f)
    state["rng"] = base64.b64encode(bytes(range(16))).decode("ascii")  # as torch.Generator("cuda").get_state() saves
    state["checksum"] = json_checksum(state)
    with open(file, "w") as f:
        json.dump(state, f)
    again = Session.open(path, model, gistnet, lensnet, mc)
    fresh = Session.create(model, gistnet, lensnet, mc)
    assert again.wc == wc and again.tree.num_tokens == 150
    assert torch.equal(again.generator.get_state(), fresh.generator.get_state())
    again.close()


def test_bad_sessions_are_one_line_errors(tmp_path):
    model, gistnet, lensnet, mc = parts()
    with pytest.raises(UserError, match="no session.json"):
        Session.open(str(tmp_path), model, gistnet, lensnet, mc)
    path = str(tmp_path / "s")
    s = Session.create(model, gistnet, lensnet, mc, path=path)
    s.feed(stream(50))
    s.save()
    s.close()
    with pytest.raises(UserError, match=r"already holds a session: resume it \(chat_cli --session .*\) or delete it$"):  # it named a --resume flag no script has
        Session.create(model, gistnet, lensnet, mc, path=path)
    with open(os.path.join(path, "session.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(UserError, match="unreadable session"):
        Session.open(path, model, gistnet, lensnet, mc)
    with pytest.raises(UserError, match="lives in RAM"):
        Session.create(model, gistnet, lensnet, mc).save()
    with pytest.raises(UserError, match="w_max"):
        Session.create(model, gistnet, lensnet, mc, w_max=40)
    with pytest.raises(UserError, match="prompt"):
        next(Session.create(model, gistnet, lensnet, mc).generate(3))


def test_score_is_the_teacher_forced_nll_that_generate_samples_from():
    model, gistnet, lensnet, mc = parts()
    for gist_first in (False, True):
        a = Session.create(model, gistnet, lensnet, mc, predictor=FixedPredictor(64), gist_first=gist_first)
        b = Session.create(model, gistnet, lensnet, mc, predictor=FixedPredictor(64), gist_first=gist_first)
        a.feed(stream(90))
        b.feed(stream(90))
        greedy = [t for t, _ in a.generate(50, temperature=0.0)]  # crosses blocks: plans made and dropped
        nll = b.score(greedy)
        assert nll.shape == (50,) and b.wc == a.wc and b.plan is None
        # greedy tokens are each step's argmax, so their NLL is the smallest of the vocabulary at that step
        c = Session.create(model, gistnet, lensnet, mc, predictor=FixedPredictor(64), gist_first=gist_first)
        c.feed(stream(90))
        for t, n in zip(greedy[:5], nll[:5]):
            logp = torch.log_softmax(c.logits.float(), -1)
            assert int(logp.argmax()) == t and float(-logp[t]) == pytest.approx(float(n), abs=1e-5)
            if gist_first and c.tree.num_tokens % K == 0:
                c._make_plan()
            c.feed([t])
        d = Session.create(model, gistnet, lensnet, mc, predictor=FixedPredictor(64), gist_first=gist_first)
        d.feed(stream(90))
        other = [(t + 1) % VOCAB for t in greedy[:10]]  # not the argmax anywhere
        nll_d, hits = d.score(greedy[:10] + other, hits=True)
        assert hits.tolist() == [True] * 10 + [False] * 10 and torch.allclose(nll_d[:5], nll[:5], atol=1e-5)


def test_refocus_on_demand_edits_until_lensnet_is_content():
    model, gistnet, lensnet, mc = parts()  # tau 0: LensNet's random scores make edits where the allocator can
    s = Session.create(model, gistnet, lensnet, mc)
    s.feed(stream(600))
    refocuses = s.stats["refocuses"]
    logits = s.refocus(5)
    steps = s.stats["refocuses"] - refocuses
    assert 1 <= steps <= 5
    assert steps == 5 or s.stats["last_edits"] == 0  # it stopped early only at a step with no edit
    check_working_context(s.wc, s.tree, mc.w_max - K, mc.recent_tokens)
    assert torch.allclose(logits, full_forward_logits(s), atol=1e-4)  # the cache follows the new WC
    quiet = Session.create(*parts(lens_tau=2.0))  # no score passes tau: the first step makes no edit and it stops
    quiet.feed(stream(600))
    r = quiet.stats["refocuses"]
    quiet.refocus(5)
    assert quiet.stats["refocuses"] == r + 1
    with pytest.raises(UserError, match="prompt"):
        Session.create(model, gistnet, lensnet, mc).refocus()


# -----------------------------------------------------------------------------
# Core-Knowledge memories attached to a session (composite.py)

def make_ck(path, model, gistnet, n, seed):
    """A Core-Knowledge tree on disk, as scripts/mc_build_ck.py leaves it (n: a multiple of K, as it pads)."""
    from nanochat.megacontext.gistnet import AnyLevel
    from nanochat.megacontext.tree import MegaContextTree
    tree = MegaContextTree(model.config.n_embd, AnyLevel(gistnet), model.embed_tokens, path=str(path))
    tree.ingest(stream(n, seed=seed))
    tree.close()
    return str(path)


def test_attached_memories_stream_legal_and_the_cache_equals_a_full_forward(tmp_path):
    model, gistnet, lensnet, mc = parts(w_max=192)
    s = Session.create(model, gistnet, lensnet, mc)
    s.attach(make_ck(tmp_path / "facts", model, gistnet, 704, seed=11)).attach(make_ck(tmp_path / "more", model, gistnet, 1504, seed=12))
    assert s.source.offsets == [0, 704, 2208]
    tokens = stream(600)
    s.feed(tokens[:40])
    for i, t in enumerate(tokens[40:]):
        logits = s.feed([t])
        check_working_context(s.wc, s.source, 192, mc.recent_tokens, 0.5)
        if i % 41 == 0 or i > len(tokens) - 45:
            items = slot_items(s.wc, None)
            b = s.slots.assemble_from(items, 0, s.source)
            with torch.no_grad():
                full = model(b["idx"], inputs_embeds=b["embeds"], rotary=slot_rotary(model, b["positions"], b["lod"]), lod=b["lod"])[0, -1]
            assert torch.allclose(logits, full, atol=1e-4), f"cache diverged at token {40 + i}"
    # the runtime lays the slots out as composite.py does (tested there against the memories read as one text)
    a = s.wc.assemble(s.source, model.embed_tokens)
    assert torch.equal(b["positions"][0], a["positions"]) and torch.equal(b["lod"][0], a["lod"])
    assert torch.allclose(b["embeds"][0], a["embeds"])
    f = s.focus()
    assert set(f["memories"]) == {"facts", "more", "session"} and f["wc_cost"] == sum(m["slots"] for m in f["memories"].values())
    assert f["memories"]["facts"]["edits"] + f["memories"]["more"]["edits"] > 0  # LensNet's edits reached the memories
    assert "memory facts:" in format_focus(f)


def test_a_session_with_memories_saves_and_reopens_exactly(tmp_path):
    model, gistnet, lensnet, mc = parts(w_max=160)
    ck = make_ck(tmp_path / "ck", model, gistnet, 896, seed=5)
    ref = Session.create(model, gistnet, lensnet, mc, seed=3).attach(ck)
    ref.feed(stream(200))
    expected = [t for t, _ in ref.generate(50, temperature=1.0)]
    path = str(tmp_path / "session")
    s = Session.create(model, gistnet, lensnet, mc, path=path, seed=3).attach(ck)
    s.feed(stream(200))
    head = [t for t, _ in s.generate(20, temperature=1.0)]
    s.save()
    wc = s.wc
    s.close()
    again = Session.open(path, model, gistnet, lensnet, mc)
    assert again.wc == wc and wc.num_memories == 2 and [n for n, _, _ in again.memories] == ["ck"]
    tail = [t for t, _ in again.generate(30, temperature=1.0)]
    assert head + tail == expected


def test_attaching_a_memory_is_checked(tmp_path):
    model, gistnet, lensnet, mc = parts()
    ck = make_ck(tmp_path / "ck", model, gistnet, 96, seed=5)
    s = Session.create(model, gistnet, lensnet, mc).attach(ck)
    with pytest.raises(UserError, match="already attached"):
        s.attach(ck)
    with pytest.raises(UserError, match="no such directory"):
        s.attach(str(tmp_path / "missing"))
    s.feed(stream(10))
    with pytest.raises(UserError, match="before the session's first token"):
        s.attach(ck, name="again")


@pytest.mark.parametrize("ck_tokens", [1536, 4096, 32 * 32 * 40])
@pytest.mark.parametrize("w_max", [128, 96])
def test_memories_never_squeeze_the_session_below_its_coarsest_view(tmp_path, ck_tokens, w_max):
    """Turns of every length, LensNet editing freely: the composite stays legal after every feed (the
    session's recent tokens raw). With w_max 128 the session's whole history stays reachable however
    the memories are focused; 96 cannot hold a 2.5k-token session's coarsest view (2 LOD2 + 14 LOD1
    gists + up to 63 raw tokens > 64; anything past 126 tokens), so such a session is refused."""
    if w_max == 96:
        model, gistnet, lensnet, mc = parts(w_max=w_max, recent=32)  # a training config may say 96
        with pytest.raises(UserError, match="reachable only up to 126 tokens .* use w_max >= 106"):
            Session.create(model, gistnet, lensnet, mc)
        return
    model, gistnet, lensnet, mc = parts(w_max=w_max, recent=32)
    s = Session.create(model, gistnet, lensnet, mc).attach(make_ck(tmp_path / "ck", model, gistnet, ck_tokens, seed=2))
    rng = torch.Generator().manual_seed(0)
    fed = 0
    while fed < 2500:
        n = int(torch.randint(1, 80, (1,), generator=rng))
        s.feed(stream(n, seed=fed))
        fed += n
        check_working_context(s.wc, s.source, w_max, 32, 0.5)
        assert s.wc.segments[-1].start == 0  # the session is tiled whole: nothing of it dropped
    assert s.focus()["memories"]["ck"]["slots"] >= 1


def test_a_session_saved_before_its_first_token_keeps_its_memories(tmp_path):
    model, gistnet, lensnet, mc = parts()
    ck = make_ck(tmp_path / "ck", model, gistnet, 320, seed=4)
    path = str(tmp_path / "s")
    s = Session.create(model, gistnet, lensnet, mc, path=path).attach(ck)
    s.save()
    s.close()
    again = Session.open(path, model, gistnet, lensnet, mc)
    assert [p for _, _, p in again.memories] == [ck]
    again.feed(stream(40))
    assert again.focus()["memories"]["ck"]["slots"] > 0
    again.save()
    with open(os.path.join(path, "session.json")) as f:
        state = json.load(f)
    state["memories"][0]["wc"] = [[1, 0, 32]]  # a segment that no longer tiles its memory
    with open(os.path.join(path, "session.json"), "w") as f:
        json.dump(state, f)
    with pytest.raises(UserError, match="does not match its checksum"):  # a changed byte is refused
        Session.open(path, model, gistnet, lensnet, mc)
    state["checksum"] = json_checksum(state)  # as a tool rewriting the file would: then the WC is checked against the trees
    with open(os.path.join(path, "session.json"), "w") as f:
        json.dump(state, f)
    again.close()
    with pytest.raises(UserError, match="does not fit this session's trees"):
        Session.open(path, model, gistnet, lensnet, mc)


class Killed(BaseException):
    """A kill -9 at one point of a save: nothing after that point runs."""


def test_a_kill_at_any_point_of_save_leaves_the_old_or_the_new_session(tmp_path, monkeypatch):
    """Every fsync / pwrite / chmod / rename of Session.save is a point a kill can land on. Killed at
    each in turn (the process then gone: the tree closed unflushed), the directory opens again, at the
    state of the save before or of the one killed, never a mix; once the save returned, the new one."""
    model, gistnet, lensnet, mc = parts()
    calls, kill_at = [], [None]

    def point(name, fn):
        def wrapped(*args, **kwargs):
            if kill_at[0] is not None:
                calls.append(name)
                if len(calls) == kill_at[0]:
                    raise Killed(name)
            return fn(*args, **kwargs)
        return wrapped

    for name in ("fsync", "pwrite", "chmod", "replace"):
        monkeypatch.setattr(os, name, point(name, getattr(os, name)))

    def run(k):
        path = str(tmp_path / f"s{k}")
        s = Session.create(model, gistnet, lensnet, mc, path=path, seed=1)
        s.feed(stream(150))
        s.save()
        old = (150, s.wc, s.logits.clone())
        s.feed(stream(100, seed=2))
        new = (250, s.wc, s.logits.clone())
        calls.clear()
        kill_at[0] = k if k is not None else 10 ** 9
        try:
            s.save()
            done = True
        except Killed:
            done = False
        kill_at[0] = None
        s.tree.close(flush=False)
        again = Session.open(path, model, gistnet, lensnet, mc)
        got = [state for state in (old, new) if again.tree.num_tokens == state[0] and again.wc == state[1]]
        assert got and torch.allclose(again.logits, got[0][2], atol=1e-4), f"kill at point {k}: a state that was never saved"
        assert not done or got[0] is new
        again.close()
        return len(calls), got[0] is new

    points, _ = run(None)
    assert points >= 6  # rows (data, header) per level, the session.json write and rename, meta.json
    outcomes = [run(k)[1] for k in range(1, points + 1)]
    assert not outcomes[0] and outcomes[-1]  # killed at the first step: the old state; at the last: the new one


def test_a_session_on_disk_opens_again_even_if_killed_before_its_first_save(tmp_path):
    model, gistnet, lensnet, mc = parts()
    path = str(tmp_path / "s")
    s = Session.create(model, gistnet, lensnet, mc, path=path)
    s.feed(stream(70))
    s.tree.close(flush=False)  # killed: never saved
    again = Session.open(path, model, gistnet, lensnet, mc)
    assert again.tree.num_tokens == 0 and again.wc is None
    again.feed(stream(70))  # and it goes on as a new one would
    assert again.tree.num_tokens == 70


@pytest.mark.parametrize("w_max,recent,max_level", [(128, 64, 1), (96, 32, 1), (256, 192, 2), (128, 64, 6)])
def test_a_session_whose_w_max_would_drop_its_history_is_refused_with_the_w_max_that_works(w_max, recent, max_level):
    """The budgets that degrade to a sliding window (the coarsest view of a few hundred tokens already
    passes w_max - K): one line naming how far they reach and the smallest w_max that reaches 4x. A
    training config may use them (its histories are one sequence); a chat session may not."""
    pattern = r"keeps the whole history reachable only up to [\d,]+ tokens .* use w_max >= (\d+)"
    model, gistnet, lensnet, mc = parts(w_max=256, recent=recent)
    mc = replace(mc, max_level=max_level)
    MegaContextConfig(w_max=w_max, recent_tokens=recent, max_level=max_level).validate()  # fine for training
    with pytest.raises(UserError, match="^w_max .*" + pattern) as e:
        Session.create(model, gistnet, lensnet, mc, w_max=w_max)
    need = int(re.search(pattern, str(e.value)).group(1))
    assert need > w_max
    with pytest.raises(UserError, match=pattern):
        Session.create(model, gistnet, lensnet, mc, w_max=need - 1)  # it is the smallest
    s = Session.create(model, gistnet, lensnet, mc, w_max=need)  # and it is accepted
    assert s.reach >= 4 * need


@pytest.mark.parametrize("w_max,recent", [(128, 32), (160, 32), (128, 0)])
def test_an_accepted_session_keeps_every_token_reachable_and_refocuses_per_block(w_max, recent):
    """A sweep of feeds (one token, a block, several blocks at once) up to the reach the config
    promises: the WC always tiles the whole history, and a feed completing b blocks refocuses b times."""
    from nanochat.megacontext.working_context import reachable_history
    model, gistnet, lensnet, mc = parts(w_max=w_max, recent=recent)
    s = Session.create(model, gistnet, lensnet, mc)
    limit = min(s.reach, 3000)
    assert s.reach == reachable_history(w_max - K, recent) > reachable_history(w_max - K, recent, mc.max_level)  # past LOD1
    rng, fed = torch.Generator().manual_seed(1), 0
    while fed < limit:
        n = min(limit - fed, int(torch.randint(1, 3 * K, (1,), generator=rng)))
        before = s.stats["refocuses"]
        s.feed(stream(n, seed=fed))
        blocks = (fed + n) // K - fed // K
        fed += n
        assert s.wc.start == 0, f"the oldest tokens left the WC at {fed} tokens"
        if fed - n > 0 and n < w_max:  # (a first feed or one of w_max tokens restarts the WC: one refocus)
            assert s.stats["refocuses"] - before == blocks


def unverified(path):
    """Drop the page checksums from a tree's commit records (meta.json, and session.json's copy, its
    checksum redone), as in a tree saved before they existed: its rows are then read unverified."""
    for name in ("meta.json", "session.json"):
        file = os.path.join(path, name)
        if os.path.exists(file):
            state = json.load(open(file))
            meta = state["tree"] if name == "session.json" else state
            meta.pop("page_crc32"), meta.pop("checksum")
            if name == "session.json":
                state["checksum"] = json_checksum(state)
            json.dump(state, open(file, "w"))


def test_a_memory_or_session_damaged_on_disk_is_refused_at_open_naming_the_row(tmp_path):
    """A changed row fails its page checksum at open. Unverified (a tree saved before checksums),
    LOD0 ids past the vocabulary and NaN gists are still found in one pass at open, not later deep
    in gpt.embed_tokens or the allocator."""
    import numpy as np
    from nanochat.megacontext.tree import HEADER_BYTES
    model, gistnet, lensnet, mc = parts()
    ck = make_ck(tmp_path / "ck", model, gistnet, 40 * K, seed=3)
    with open(os.path.join(ck, "lod0.bin"), "r+b") as f:
        f.seek(HEADER_BYTES + 4 * 77)
        f.write(np.uint32(0xFFFFFFFF).tobytes())
    with pytest.raises(UserError, match=f"{ck}/lod0.bin: rows 0..1279 do not match their checksum"):
        Session.create(model, gistnet, lensnet, mc).attach(ck)
    unverified(ck)
    with pytest.raises(UserError, match=f"Core-Knowledge memory {ck}: token 77 has id 4294967295, outside the model's"):
        Session.create(model, gistnet, lensnet, mc).attach(ck)
    ck2 = make_ck(tmp_path / "ck2", model, gistnet, 40 * K, seed=3)
    with open(os.path.join(ck2, "lod1.bin"), "r+b") as f:
        f.seek(HEADER_BYTES + 2 * (model.config.n_embd * 5 + 3))
        f.write(np.uint16(0x7E00).tobytes())  # fp16 NaN in gist row 5
    with pytest.raises(UserError, match="lod1.bin: rows 0..39 do not match their checksum"):
        Session.create(model, gistnet, lensnet, mc).attach(ck2)
    unverified(ck2)
    with pytest.raises(UserError, match="a level-1 gist in rows 0..39 holds NaN or inf"):
        Session.create(model, gistnet, lensnet, mc).attach(ck2)
    path = str(tmp_path / "s")
    s = Session.create(model, gistnet, lensnet, mc, path=path)
    s.feed(stream(100))
    s.save()
    s.close()
    with open(os.path.join(path, "lod0.bin"), "r+b") as f:
        f.seek(HEADER_BYTES + 4 * 10)
        f.write(np.uint32(model.config.vocab_size).tobytes())
    with pytest.raises(UserError, match="lod0.bin: rows 0..99 do not match their checksum"):
        Session.open(path, model, gistnet, lensnet, mc)
    unverified(path)
    with pytest.raises(UserError, match="token 10 has id"):
        Session.open(path, model, gistnet, lensnet, mc)


def test_a_bf16_model_decodes_through_the_runtime_with_fp16_gists_and_fp32_positions():
    """The dtype boundaries (nanochat/megacontext/__init__.py): tree gists stored fp16, read back as
    fp32; slot embeddings and the KV cache in the model's dtype (bf16 here, as load_model casts on an
    Ampere+ GPU); rotary angles from fp64 positions in fp32. A bf16 session tracks the fp32 one."""
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, gistnet, lensnet, mc = parts()
        model.cast_embeddings(dtype)
        s = Session.create(model, gistnet, lensnet, mc)
        logits = [s.feed(stream(300))]
        for t in stream(70, seed=2):
            logits.append(s.feed([t]))
        assert s.tree.levels[1].buf.dtype == np.uint16 and s.tree.dtype == torch.float16  # gists: fp16 bits
        assert s.slots.cache.k.dtype == dtype and all(torch.isfinite(x).all() for x in logits)
        assert s.tree.gists(1, 0, 2).dtype == torch.float32
        results[dtype] = torch.stack([x.float() for x in logits])  # (71, V)
    full, half = results[torch.float32], results[torch.bfloat16]
    agree = (full.argmax(-1) == half.argmax(-1)).float().mean()
    gap = (full.log_softmax(-1) - half.log_softmax(-1)).abs().max()
    assert agree > 0.95 and gap < 0.05, (agree, gap)  # measured: 1.0, 0.0044
