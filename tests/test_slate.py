"""The slate's pieces (nanochat/megacontext/slate.py): budgets, random mixes and perturbations, the probes it logs."""

import random

import pytest
import torch

from nanochat.megacontext.config import MegaContextConfig
from nanochat.megacontext.horizon import build_source
from nanochat.megacontext.slate import (Variant, fact_stats, gist_pair_cos, perturb, random_mix, split_memories,
                                        variant_budget)
from nanochat.megacontext.working_context import Entry, WorkingContext, check_working_context
from test_training import T, V, make


def test_variant_budget_anneals_from_the_history_to_w_max_in_whole_blocks():
    mc = MegaContextConfig(w_max=128, anneal_frac=0.5)
    assert variant_budget(0, 100, 993, mc) == 1024  # the whole history, in whole blocks
    assert variant_budget(50, 100, 993, mc) == 128 and variant_budget(99, 100, 993, mc) == 128
    assert variant_budget(99, 100, 993, MegaContextConfig(w_max=130, anneal_frac=0.5)) == 130  # never rounded past w_max
    mid = variant_budget(25, 100, 993, mc)
    assert 128 < mid < 992 and mid % 32 == 0
    assert variant_budget(0, 100, 993, MegaContextConfig(w_max=128, anneal_frac=0.0)) == 128


def test_random_mix_and_perturb_are_legal_within_budget_and_their_edits_describe_them():
    model, gistnet, _, mc = make()
    seq = torch.randint(0, V, (353,), generator=torch.Generator().manual_seed(1))
    source = build_source(model, gistnet, seq, mc.max_level)
    rng = random.Random(0)
    seen = set()
    for _ in range(20):
        ref = random_mix(source, 128, mc, rng)
        check_working_context(ref, source, 128, mc.recent_tokens)
        assert ref.start == 0 and ref.cost + 31 > 128  # covers the whole history and uses the budget
        seen.add(ref)
        wc, edits = perturb(ref, source, 128, mc.recent_tokens, rng, n_edits=2)
        check_working_context(wc, source, 128, mc.recent_tokens)
        assert edits and set(edits) <= set(ref.entries)
        for entry, value in edits.items():
            assert entry not in wc.entries  # every edited reference entry is gone from the variant
            if value == 1.0:
                assert entry.level == 1 and Entry(0, entry.start, entry.end) in wc.entries  # expanded
            else:
                assert value == -1.0 and entry.level == 0 and entry.parent in wc.entries  # collapsed (LOD0 -> LOD1: one member)
    assert len(seen) > 5  # diverse mixes
    assert random_mix(source, 40, mc, rng) is None  # even the coarsest WC does not fit


def test_fact_stats_say_where_the_asked_fact_is():
    from nanochat.megacontext.probes import fact_block
    model, gistnet, lensnet, mc = make()
    g = torch.Generator().manual_seed(5)
    rows = torch.randint(10, V, (1, T + 1), generator=g)
    answer = torch.tensor([1, 2, 3, 4])  # " <value>." stand-in: the value is 1, 2, 3
    rows[0, 70:73] = answer[:-1]  # the fact states it in block 2 (tokens 64..95)
    c = T + 1 - 32
    rows[0, c + 10:c + 14] = answer  # ... and the horizon asks for it
    weights = torch.zeros(1, T)
    weights[0, c - 1 + 10:c - 1 + 14] = 1
    assert fact_block(rows[0, :c], answer) == 2
    source = build_source(model, gistnet, rows[0, :c], mc.max_level)
    coarse = WorkingContext.coarsest(source, mc.recent_tokens, 1)
    expanded = coarse.expand(2)  # entry 2 is block 2's gist
    variants = [Variant(0, "baseline", WorkingContext.recent(source, 128), None), Variant(0, "reference", coarse, {}),
                Variant(0, "perturbed", expanded, {})]
    scores = torch.zeros(1, len(coarse))
    scores[0, 2] = 1.0  # LensNet's top gist: the fact's
    out = fact_stats(rows, [c], weights, 32, variants, [coarse], [0], scores)
    assert out["fact_raw_baseline"] == 0 and out["fact_raw_reference"] == 0 and out["fact_raw_perturbed"] == 1
    assert out["fact_lens_top"] == 1
    scores[0, 2], scores[0, 5] = 0.0, 2.0
    assert fact_stats(rows, [c], weights, 32, variants, [coarse], [0], scores)["fact_lens_top"] == 0


def test_gist_pair_cos_detects_a_collapsed_gistnet():
    from nanochat.megacontext.horizon import SequenceSource
    same = SequenceSource(torch.zeros(96, dtype=torch.long), [None, torch.ones(3, 8)])
    spread = SequenceSource(torch.zeros(96, dtype=torch.long), [None, torch.eye(3, 8)])
    assert gist_pair_cos([same]) == pytest.approx(1.0) and gist_pair_cos([spread]) == pytest.approx(0.0)


def test_split_memories_cuts_the_history_into_a_ck_and_a_session_on_a_block():
    model, gistnet, _, _ = make()
    history = torch.randint(0, V, (353,))
    for seed in range(5):
        src = split_memories(model, gistnet, history, 1, random.Random(seed))
        a = src.memories[0].num_tokens
        assert a % 32 == 0 and 353 // 4 - 32 <= a <= 3 * 353 // 4 and src.names == ["ck", "session"]
        assert torch.equal(torch.cat([m.token_ids for m in src.memories]), history) and src.offsets == [0, a]
