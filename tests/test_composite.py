"""Composite memories (nanochat/megacontext/composite.py): CK memories and the session in one WC."""

import json

import pytest
import torch
import torch.nn.functional as F

from nanochat.gpt import GPT, GPTConfig
from nanochat.megacontext import BLOCK_SIZE as K
from nanochat.megacontext.checkpoint import build_modules
from nanochat.megacontext.allocator import FocusAllocator, refocus
from nanochat.megacontext.composite import CK_FILE, CompositeSource, attribution, read_ck_manifest, starting_wc
from nanochat.megacontext.config import MegaContextConfig
from nanochat.megacontext.horizon import build_source, horizon_nll
from nanochat.megacontext.working_context import (Entry, OneMemory, WorkingContext, WorkingContextError, check_working_context,
                                                  ck_cap)
from conftest import jitter

V = 256


def tiny(w_max=256, **mc):
    """A real GPT (n_embd 64, 2 layers) jittered off its init, fresh GistNet / LensNet."""
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=512, vocab_size=V, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SL")
    model = GPT(config)
    model.init_weights()
    jitter(model.parameters(), 0.05)
    cfg = MegaContextConfig(w_max=w_max, max_level=2, recent_tokens=32, horizon=32, gist_layers=1, lens_layers=1,
                            lens_hidden=64, **mc).validate()
    gistnet, lensnet = build_modules(cfg, config)
    return model, gistnet, lensnet, cfg


def composite(model, gistnet, lengths, seed=1):
    """A CompositeSource over memories of the given token counts (the last one the session)."""
    g = torch.Generator().manual_seed(seed)
    memories = [build_source(model, gistnet, torch.randint(0, V, (n,), generator=g), 2) for n in lengths]
    return CompositeSource(memories)


def all_raw(source):
    return WorkingContext.joined([WorkingContext.recent(src, src.num_tokens + K) for src in source.memories])


def ck_cost(wc):
    return wc.cost - wc.segments[-1].cost


@torch.no_grad()
def test_an_all_raw_composite_reads_like_the_memories_concatenated():
    """Positions: memory m's token t at offsets[m] + t, so raw segments are the concatenated text."""
    model, gistnet, _, _ = tiny()
    source = composite(model, gistnet, [70, 45, 100])
    assert source.offsets == [0, 70, 115] and source.num_tokens == 215
    cwc = all_raw(source)
    horizon = torch.randint(0, V, (8,))
    nll = horizon_nll(model, [cwc], [source], [horizon])[0]  # (8,)
    ids = torch.cat([src.token_ids for src in source.memories] + [horizon])
    logits = model(ids[None, :-1])[0, -8:]
    assert torch.allclose(nll, F.cross_entropy(logits.float(), horizon, reduction="none"), atol=1e-4)
    a = cwc.assemble(source, model.embed_tokens)
    assert a["entry"].max().item() == len(cwc) - 1 and a["positions"][-1].item() == 214


def test_gists_sit_at_their_memorys_offset():
    model, gistnet, _, _ = tiny()
    source = composite(model, gistnet, [128, 64])
    ck = WorkingContext([Entry(1, 0, 32), Entry(1, 32, 64), Entry(0, 64, 96), Entry(0, 96, 128)])
    cwc = WorkingContext.joined([ck, WorkingContext.recent(source.session, 64)])
    a = cwc.assemble(source, model.embed_tokens)
    assert a["positions"][:3].tolist() == [15.5, 47.5, 64.0]
    assert a["positions"][66:].tolist() == [128.0 + t for t in range(64)]
    assert a["lod"].tolist() == [1, 1] + [0] * 128
    assert torch.equal(a["embeds"][0], source.memories[0].gists(1, 0, 1)[0])


class Tokens(OneMemory):
    """A source of n tokens with every complete gist (what ck_cap and WorkingContext.coarsest read)."""

    def __init__(self, n):
        self.num_tokens = n

    def num_gists(self, level):
        return self.num_tokens // K ** level


def test_ck_cap_lends_the_unused_session_share_but_never_the_sessions_coarsest_view():
    cap = lambda n, w=256, share=0.5, recent=32: ck_cap(CompositeSource([Tokens(5000), Tokens(n)]), w, share, recent)
    assert cap(10_000) == 128   # a long session keeps its half
    assert cap(40) == 216       # a short one lends the rest to the CKs
    assert cap(10_000, share=0.75) == 64
    # w_max 128: the session's half is 64 slots, but a 1010-token session at its coarsest (30 LOD1
    # gists, then the blocks holding its newest 32 tokens raw: 30 + 50 = 80 slots) needs more
    assert WorkingContext.coarsest(Tokens(1010), 32).cost == 80 and cap(1010, w=128) == 128 - 80


@pytest.mark.parametrize("session_tokens", [600, 40])
def test_the_allocator_expands_into_the_cks_up_to_the_cap_and_never_past_it(session_tokens):
    """A long session keeps half of w_max and LensNet's expansions fill the WC; a short one (all raw)
    lends its unused share, and the CKs grow past half, up to the cap."""
    model, gistnet, _, cfg = tiny(w_max=256)
    source = composite(model, gistnet, [2048, 1024, session_tokens])
    cwc = check_working_context(starting_wc(source, cfg.w_max, cfg.recent_tokens, 0.5), source, 256, 32, 0.5)
    allocator = FocusAllocator.from_config(cfg)
    cap = ck_cap(source, 256, 0.5, 32)
    expanded = 0
    for _ in range(20):  # LensNet wants everything expanded
        cwc, edits = allocator.step(cwc, torch.ones(len(cwc)), source)
        expanded += sum(e.kind == "expand" for e in edits)
        check_working_context(cwc, source, 256, 32, 0.5)
        assert ck_cost(cwc) <= cap and cwc.cost <= 256
    assert expanded > 0 and cwc.cost > 256 - (K - 1)  # full, as far as whole expansions go
    if session_tokens == 40:
        assert cap == 216 and ck_cost(cwc) > cap - (K - 1)


def test_the_diversity_penalty_spreads_expansions_across_memories():
    """Two CKs, the one already holding much more of the WC scored a little higher: without the
    penalty the next expansion goes to it, with the penalty to the other one."""
    model, gistnet, _, cfg = tiny(w_max=512)
    source = composite(model, gistnet, [1024, 1024, 64])
    big = WorkingContext([Entry(0, s, s + K) for s in range(0, 256, K)] + [Entry(1, s, s + K) for s in range(256, 1024, K)])
    small = WorkingContext.coarsest(source.memories[1], max_level=1)
    cwc = WorkingContext.joined([big, small, WorkingContext.recent(source.session, 64)])
    scores = torch.tensor([0.0] * 8 + [0.55] * 24 + [0.5] * 32 + [0.0] * 2)  # big: 280 slots, small: 32
    for diversity, memory in ((0.0, 0), (0.5, 1)):
        cfg_d = MegaContextConfig(**{**cfg.to_dict(), "ck_diversity": diversity, "n_diff": 1, "tau_collapse": 1.0})
        allocator = FocusAllocator.from_config(cfg_d)
        _, edits = allocator.step(cwc, scores, source)
        assert [(e.before[0].memory, e.kind) for e in edits] == [(memory, "expand")], diversity


def test_refocus_scores_a_composite_with_lensnet():
    model, gistnet, lensnet, cfg = tiny(w_max=256)
    with torch.no_grad():
        lensnet.head.weight.mul_(50.0)  # saturate LensNet's tanh: most entries pass the thresholds
    source = composite(model, gistnet, [3000, 900])
    cwc = starting_wc(source, cfg.w_max, cfg.recent_tokens, cfg.ck_min_session_share)
    allocator = FocusAllocator.from_config(cfg)
    new, steps = refocus(model, lensnet, allocator, cwc, source, iterations=4)
    check_working_context(new, source, 256, 32, 0.5)
    assert sum(len(s) for s in steps) > 0 and new != cwc
    report = attribution(new, source, [e for s in steps for e in s])
    assert set(report) == {"ck0", "session"}
    assert sum(r["slots"] for r in report.values()) == new.cost
    assert report["ck0"]["covered"] == 3000 and report["session"]["tokens"] == 900
    assert sum(r["edits"] for r in report.values()) == sum(len(s) for s in steps)


def test_check_working_context_names_the_broken_invariant_of_a_composite():
    model, gistnet, _, _ = tiny()
    source = composite(model, gistnet, [256, 300])
    raw_ck = WorkingContext.recent(source.memories[0], 256)
    session = WorkingContext.recent(source.session, 128)
    with pytest.raises(WorkingContextError, match="session share"):
        check_working_context(WorkingContext.joined([raw_ck, session]), source, 480, 32, 0.5)  # CK 256 > 480 - 240, total 384 fits
    with pytest.raises(WorkingContextError, match="memory ck0: tiling"):
        check_working_context(WorkingContext.joined([WorkingContext([Entry(0, 0, 32)]), session]), source, 512, 32, 0.5)
    with pytest.raises(WorkingContextError, match="memory session: no entries"):
        check_working_context(WorkingContext.joined([session]), source, 512, 32, 0.5)
    swapped = WorkingContext(WorkingContext.joined([raw_ck, session]).entries[::-1])
    with pytest.raises(WorkingContextError, match="memory by memory"):
        check_working_context(swapped, source, 1024, 32, 0.5)


def test_the_plain_working_context_is_the_one_memory_case():
    """One type for one memory and many: a lone memory's WC joins to itself, its one segment is
    itself, and a composite's segments are the WCs of each memory alone, joined back unchanged."""
    model, gistnet, _, cfg = tiny()
    source = composite(model, gistnet, [256, 300])
    ck, session = WorkingContext.coarsest(source.memories[0]), WorkingContext.recency_filled(source.session, 128, 32)
    assert WorkingContext.joined([session]) == session and session.segments == [session] and session.num_memories == 1
    cwc = WorkingContext.joined([ck, session])
    assert cwc.segments == [ck, session] and cwc.num_memories == 2 and len(cwc) == len(ck) + len(session)
    assert [e.memory for e in cwc.entries] == [0] * len(ck) + [1] * len(session)
    assert WorkingContext.joined(cwc.segments) == cwc and cwc.replace(0, ck) == cwc
    assert cwc.expand(0).entries[0].memory == 0 and cwc.expand(len(ck)).entries[len(ck)].memory == 1
    # starting_wc of a lone memory is the recency-filled WC inference starts from
    assert starting_wc(source.session, 128, 32, 0.5) == WorkingContext.recency_filled(source.session, 128, 32)


def test_a_ck_manifest_is_checked_against_its_tree(tmp_path):
    from nanochat.common import UserError
    from nanochat.megacontext.tree import MegaContextTree
    tree = MegaContextTree(16, None, None, model_name="base/d4")
    tree.ingest(list(range(3 * K)))
    path = tmp_path / "ck"
    tree.save(str(path))
    assert read_ck_manifest(str(path), tree) is None  # a plain saved tree: no manifest, nothing to check
    good = dict(format=1, model="base/d4", step=5, tokens=3 * K, levels=[3 * K], input="/docs",
                files=[dict(path="a.txt", start=0, end=40), dict(path="b.txt", start=40, end=90)])
    (path / CK_FILE).write_text(json.dumps(good))
    assert read_ck_manifest(str(path), tree) == good
    for field, value in [("format", 2), ("model", "sft/d4"), ("step", "5"), ("tokens", 3 * K + 1), ("levels", [3 * K, 3]),
                         ("input", None), ("files", [dict(path="a.txt", start=0, end=40), dict(path="b.txt", start=41, end=90)]),
                         ("files", [dict(path="a.txt", start=0, end=200)]), ("files", "all")]:
        (path / CK_FILE).write_text(json.dumps({**good, field: value}))
        with pytest.raises(UserError, match=f"ck.json: field {field} .* does not fit the memory's tree") as e:
            read_ck_manifest(str(path), tree)
        assert "\n" not in str(e.value)
    for text in ["", "[1, 2]", "{" * 100_000, '"ck"']:
        (path / CK_FILE).write_text(text)
        with pytest.raises(UserError, match="ck.json: (unreadable|field format)"):
            read_ck_manifest(str(path), tree)
