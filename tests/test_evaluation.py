"""Validation of the MegaContext path and the documents mc_eval measures (nanochat/megacontext/evaluation.py)."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import loud, stdlib_texts, tiny
from nanochat.common import UserError
from nanochat.megacontext.evaluation import (evaluate_sequences, gap_closed, gist_first_quality, left_pad, longrange_documents,
                                             measure_sequences, retrieval_documents, spearman, summarize, val_documents, validate)

V = 256


def test_nll_full_equals_the_vanilla_forward():
    model, gistnet, lensnet, cfg = tiny()
    seqs = [torch.randint(0, V, (n,)) for n in (200, 137)]  # different lengths: one row is padded
    records = measure_sequences(model, gistnet, lensnet, cfg, seqs, refocus_iters=1, audit_edits=0)
    for s, rec in zip(seqs, records):
        with torch.no_grad():
            logits = model(s[None, :-1])[0, -32:]  # (H, V): the slots that predict the last 32 tokens
        vanilla = F.cross_entropy(logits, s[-32:]).item()
        assert rec["nll_full"] == pytest.approx(vanilla, abs=1e-5)
        assert rec["nll_trunc"] != pytest.approx(vanilla, abs=1e-4)  # the window really drops history


def test_nll_trunc_is_a_vanilla_forward_over_the_newest_w_max_tokens():
    """The truncation figure is what a vanilla model with a w_max-token context scores: exactly the
    newest 64 history tokens (not whole blocks: 200 - 32 = 168 is off the 32-token grid)."""
    model, gistnet, lensnet, cfg = tiny(w_max=64)
    s = torch.randint(0, V, (200,))
    rec, = measure_sequences(model, gistnet, lensnet, cfg, [s], refocus_iters=0, audit_edits=0)
    with torch.no_grad():
        logits = model(s[None, -96:-1])[0, -32:]  # 64 history tokens, then the 32-token horizon
    assert rec["nll_trunc"] == pytest.approx(F.cross_entropy(logits, s[-32:]).item(), abs=1e-5)


def test_gap_closed_formula():
    assert gap_closed(3.0, 2.0, 2.5) == pytest.approx(0.5)
    assert gap_closed(3.0, 2.0, 3.0) == 0.0 and gap_closed(3.0, 2.0, 2.0) == 1.0
    assert gap_closed(3.0, 3.0, 2.0) is None and gap_closed(3.0, 2.995, 2.0) is None  # no gap to close
    assert gap_closed(3.0, 3.2, 2.0) is None  # the full history is worse than the window: nothing to recover

    def rec(trunc, full, mc):
        return dict(nll_trunc=trunc, nll_full=full, nll_mc=mc, violations=0, wc_util=1.0, mc_coverage=1.0, swaps=[2, 0],
                    audit=[], audit_agree=0, audit_pairs=0)
    # of the means (3.5, 2.0, 3.0) -> 1/3, not the mean of the per-sequence gaps (0 and 1/2)
    s = summarize([rec(4.0, 2.0, 4.0), rec(3.0, 2.0, 2.0)])
    assert s["gap_closed"] == pytest.approx((3.5 - 3.0) / (3.5 - 2.0)) and s["n"] == 2
    assert s["swap_rate"] == pytest.approx(1.0) and s["refocus_iters"] == 2 and s["budget_violations"] == 0
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)  # tied ranks 1.5, 1.5, 3
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1, 2], [1, 2]) is None


@pytest.mark.parametrize("max_level,lengths", [(2, (1100, 700, 900, 1000)), (1, (3000,))])
def test_budget_invariants_hold(max_level, lengths):
    """A loud LensNet edits a lot; every edit is checked by the allocator and the final WCs are legal,
    within budget; a history whose coarsest WC exceeds w_max is trimmed to fit (coverage < 1)."""
    # seed 1: a LensNet whose loud scores ask to collapse some old raw block of each full starting WC
    # (with no collapse, a full WC has no room for an expand and the allocator rightly does nothing)
    model, gistnet, lensnet, cfg = tiny(max_level=max_level, w_max=128, allocator="stochastic", seed=1)
    loud(lensnet)
    seqs = [torch.randint(0, V, (n,)) for n in lengths]
    records = measure_sequences(model, gistnet, lensnet, cfg, seqs, refocus_iters=4, audit_edits=6)
    s = summarize(records)
    assert s["budget_violations"] == 0 and 0 < s["wc_util"] <= 1
    assert all(0 < len(r["audit"]) <= 6 for r in records) and s["audit_edits"] == sum(len(r["audit"]) for r in records)
    assert f"dnll_lod{max_level}" in s and "gist_cos_lod1" in s
    if lengths == (3000,):  # 93 LOD1 gists + 32..63 raw tokens > 128 slots: the oldest gists are dropped
        assert records[0]["mc_coverage"] < 1 and records[0]["wc_util"] > 0.75
    else:
        assert sum(sum(r["swaps"]) for r in records) > 0  # the allocator did move


def test_validate_returns_finite_numbers():
    model, gistnet, lensnet, cfg = tiny()
    rows = torch.randint(0, V, (3, 257))  # (R, T + 1) as base_train's val loader packs them
    out = validate(model, gistnet, lensnet, cfg, rows)
    assert {"gap_closed", "nll_trunc", "nll_full", "nll_mc", "dnll_lod1", "gist_cos_lod1", "budget_violations", "wc_util"} <= set(out)
    assert all(isinstance(v, float) for v in out.values())
    # random tokens: the full history does not beat the window by MIN_GAP, so gap_closed is NaN (no gap to close)
    assert math.isnan(out["gap_closed"]) == (out["nll_trunc"] - out["nll_full"] < 0.01)
    assert all(math.isfinite(v) for k, v in out.items() if k != "gap_closed"), out
    assert out["budget_violations"] == 0 and out["wc_util"] <= 1


def test_answer_tokens_and_bad_input():
    model, gistnet, lensnet, cfg = tiny()
    seqs = [torch.randint(0, V, (300,)) for _ in range(2)]
    s = evaluate_sequences(model, gistnet, lensnet, cfg, seqs, refocus_iters=1, audit_edits=0, answer_tokens=[4, 0])
    assert s["n_answer"] == 1 and {"ans_nll_trunc", "ans_nll_mc", "ans_nll_full", "ans_gap_closed"} <= set(s)
    with pytest.raises(UserError, match="history tokens"):
        evaluate_sequences(model, gistnet, lensnet, cfg, [torch.randint(0, V, (40,))])


def test_gist_first_quality_scores_the_same_tokens_both_ways():
    """Token-first through a session whose WC stays all raw is the plain forward's NLL; gist-first
    puts a plan slot in front of the block that opens at token 32, so it reads those tokens differently."""
    from nanochat.megacontext.megaprediction import MegaPredictor
    model, gistnet, lensnet, cfg = tiny(w_max=128)  # the runtime needs recent_tokens + 2 blocks of room
    torch.manual_seed(3)
    predictor = MegaPredictor(64, 1)
    docs = [torch.randint(0, V, (60,)).tolist() for _ in range(2)]
    out = gist_first_quality(model, gistnet, lensnet, predictor, cfg, docs, 20)
    with torch.no_grad():
        ids = torch.tensor(docs)
        plain = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none").view(2, -1)
    assert out["docs"] == 2 and out["scored_tokens"] == 80
    assert out["nll_token_first"] == pytest.approx(plain[:, 19:].mean().item(), abs=1e-4)
    assert abs(out["gist_first_delta"]) > 1e-4
    assert out["gist_first_delta"] == pytest.approx(out["nll_gist_first"] - out["nll_token_first"])


class CharTokenizer:
    """A tokenizer of one id per character (BOS = 0), enough to check the documents' lengths and cuts."""

    def get_bos_token_id(self):
        return 0

    def encode(self, text, prepend=None):
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        return ([] if prepend is None else [prepend]) + [1 + ord(c) % 250 for c in text]


def test_val_documents_are_whole_documents_joined_and_cut_to_length():
    tok, texts = CharTokenizer(), ["abc" * 10, "de" * 40, "f" * 500]
    docs = val_documents(tok, texts, 3, 50)
    assert len(docs) == 2 and all(len(d) == 50 for d in docs)  # the third text alone fills the second list
    assert docs[0][0] == 0 and docs[0][31] == 0  # each document opens with its BOS: 30 chars of the first, then the second
    assert docs[1] == tok.encode("f" * 500, prepend=0)[:50]
    assert val_documents(tok, texts, 5, 10_000) == []


def test_left_pad_fills_in_front_with_the_end_of_val_texts():
    tok = CharTokenizer()
    out = left_pad(tok, ["xyz" * 20], [7, 8, 9], 40, random.Random(0))
    assert len(out) == 40 and out[-3:] == [7, 8, 9] and out[:37] == tok.encode("xyz" * 20)[-37:]


def test_retrieval_and_longrange_documents_put_the_answer_where_it_is_scored():
    tok, texts = CharTokenizer(), stdlib_texts(4)
    for kind in ("passkey", "kv-recall", "needle"):
        docs = retrieval_documents(tok, texts, kind, 0.5, 600, 3, random.Random(1))
        assert len(docs) == 3 and all(len(h) == 600 and len(a) > 0 for h, a in docs)
    (h1, a1), = retrieval_documents(tok, texts, "passkey", 0.5, 600, 1, random.Random(1))
    assert (h1, a1) == retrieval_documents(tok, texts, "passkey", 0.5, 600, 1, random.Random(1))[0]  # seeded: the same documents
    for ids, answer in longrange_documents(tok, texts, 3, 400, 32, seed=0):
        assert len(ids) == 400 and 0 < answer <= 32
    with pytest.raises(UserError, match="horizon"):
        longrange_documents(tok, texts, 1, 400, 1, seed=0)


def test_the_audit_reports_what_a_constant_scorer_would_get():
    """Expands and collapses pooled: a constant score (+1 every expand, -1 every collapse) agreed in sign and
    rank about as well as a trained LensNet (the review: 0.635 vs 0.625), so the pooled figures alone said little."""
    base = dict(nll_trunc=3.0, nll_full=2.0, nll_mc=2.5, violations=0, wc_util=1.0, mc_coverage=1.0, swaps=[0],
                audit_agree=0, audit_pairs=0)
    audit = [(0.9, -0.3), (0.5, -0.2), (0.1, -0.1), (-0.1, 0.1), (-0.5, 0.2), (-0.9, 0.3)]  # ranks each kind exactly
    kinds = ["expand"] * 3 + ["collapse"] * 3
    out = summarize([dict(base, audit=audit, audit_kinds=kinds)])
    assert out["audit_sign_agree"] == 1.0 and out["audit_sign_base"] == 1.0  # here the sign is the kind's
    assert out["audit_spearman_within"] == pytest.approx(1.0)
    constant = [(1.0 if k == "expand" else -1.0, d) for (_, d), k in zip(audit, kinds)]
    out = summarize([dict(base, audit=constant, audit_kinds=kinds)])
    assert out["audit_sign_agree"] == 1.0 and out["audit_spearman"] > 0.8  # the pooled figures cannot tell it apart
    assert out["audit_spearman_within"] is None  # within a kind a constant ranks nothing
