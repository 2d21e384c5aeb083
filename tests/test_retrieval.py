"""Retrieval of facts from far back (nanochat/megacontext/retrieval.py) against a tiny real model."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny
from nanochat.megacontext.evaluation import full_windows
from nanochat.megacontext.retrieval import cell_mean, measure_retrieval, recall_verdict, retrieval_summary

V = 256


def greedy(model, ids, n):
    """The model's own greedy continuation of ids, n tokens (vanilla forward): an answer it gets right."""
    ids = ids.clone()
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids[None])[0, -1].argmax()[None]])
    return ids[-n:]


def test_retrieval_accuracy_on_known_answers():
    """Answers the model predicts greedily are retrieved, one wrong token is not; full reads the whole
    600-token history, past the model's windows (S=128, L=256), and matches a forward of all of it with
    the windows widened: its first token reaches the answer (it read only the newest 386, a sliding window)."""
    model, gistnet, lensnet, cfg = tiny(w_max=128)
    assert model.window_sizes == [128, 256]
    history = torch.randint(0, V, (600,))
    with full_windows(model, 700):  # what the model reading all of it predicts
        right3, right1 = greedy(model, history, 3), greedy(model, history, 1)
    wrong3 = right3.clone()
    wrong3[-1] = (wrong3[-1] + 1) % V
    records, levels = measure_retrieval(model, gistnet, lensnet, cfg, [history] * 3, [right3, wrong3, right1], refocus_iters=2)
    assert [r["correct"] for r in records["full"]] == [True, False, True] and levels == [1, 1, 1]
    with torch.no_grad(), full_windows(model, 603):
        logits = model(torch.cat([history, wrong3])[None, :-1])[0, -3:]  # (3, V): the slots that predict the answer
    assert model.window_sizes == [128, 256]  # put back
    assert records["full"][1]["nll"] == pytest.approx(F.cross_entropy(logits, wrong3).item(), abs=1e-4)
    edited = history.clone()
    edited[0] = (edited[0] + 1) % V
    again, _ = measure_retrieval(model, gistnet, lensnet, cfg, [edited], [wrong3], refocus_iters=0)
    assert abs(again["full"][0]["nll"] - records["full"][1]["nll"]) > 1e-6
    assert all(set(r) == {"correct", "nll"} for r in records["truncation"])
    assert all(set(r) == {"correct", "nll", "fact_raw", "fact_raw_start", "swaps"} for r in records["megacontext"])
    assert retrieval_summary(records["full"]) == dict(acc=pytest.approx(2 / 3), n=3, nll=pytest.approx(
        sum(r["nll"] for r in records["full"]) / 3))
    assert retrieval_summary([None, records["full"][0]]) is None
    # a history within w_max: every method reads it whole (no refocus: the MC WC is all raw), the same verdicts
    short = history[:100]
    right, wrong = greedy(model, short, 2), greedy(model, short, 2)
    wrong[0] = (wrong[0] + 1) % V
    records, _ = measure_retrieval(model, gistnet, lensnet, cfg, [short] * 2, [right, wrong], refocus_iters=0)
    for method in ("megacontext", "truncation", "full"):
        assert [r["correct"] for r in records[method]] == [True, False]
        assert [r["nll"] for r in records[method]] == pytest.approx([r["nll"] for r in records["full"]], abs=1e-5)


def test_truncation_reads_exactly_the_newest_w_max_tokens():
    """The truncation baseline is a vanilla model with a w_max-token context: its answer NLL is a plain
    forward over the newest 128 history tokens (600 - 128 = 472 is off the 32-token block grid)."""
    model, gistnet, lensnet, cfg = tiny(w_max=128)
    history, answer = torch.randint(0, V, (600,)), torch.randint(0, V, (3,))
    records, _ = measure_retrieval(model, gistnet, lensnet, cfg, [history], [answer], refocus_iters=0)
    with torch.no_grad():
        logits = model(torch.cat([history[-128:], answer])[None, :-1])[0, -3:]  # (3, V): the slots that predict the answer
    assert records["truncation"][0]["nll"] == pytest.approx(F.cross_entropy(logits, answer).item(), abs=1e-5)


def test_the_fact_raw_probe_says_whether_the_mc_wc_holds_the_fact_block_raw():
    """fact_raw: the answer's value (its tokens but the last) stated in a block the recency-filled WC keeps
    raw (the newest) -> True, in an old block it holds as a gist -> False, nowhere -> None (not counted)."""
    model, gistnet, lensnet, cfg = tiny(w_max=128)
    answer = torch.tensor([5, 6, 7])
    old, new, absent = (torch.randint(8, V, (600,), generator=torch.Generator().manual_seed(s)) for s in range(3))
    old[40:42], new[590:592] = answer[:-1], answer[:-1]
    records, _ = measure_retrieval(model, gistnet, lensnet, cfg, [old, new, absent], [answer] * 3, refocus_iters=0)
    assert [r["fact_raw"] for r in records["megacontext"]] == [False, True, None]
    assert [r["fact_raw_start"] for r in records["megacontext"]] == [False, True, None]  # no refocus: the start WC
    assert [r["swaps"] for r in records["megacontext"]] == [0, 0, 0]
    summary = retrieval_summary(records["megacontext"])
    assert summary["fact_raw"] == summary["fact_raw_start"] == 0.5 and summary["swaps"] == 0

    class Wants(torch.nn.Module):  # a LensNet that wants the second entry (block 1: the old fact's) raw, other raw blocks gisted
        n_tail, max_level = lensnet.n_tail, lensnet.max_level

        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))  # score_entries reads the dtype off a parameter

        def forward(self, entry_embeds, levels, tail_gists=None, mask=None):
            scores = torch.where(levels == 0, -0.9, 0.0)
            scores[:, 1] = 0.9
            return scores

    records, _ = measure_retrieval(model, gistnet, Wants(), cfg, [old], [answer], refocus_iters=2)
    r = records["megacontext"][0]
    assert r["fact_raw_start"] is False and r["fact_raw"] is True and r["swaps"] >= 2  # swapped in: one expand, one collapse


def test_full_attention_only_where_the_rotary_table_reaches():
    """history + answer <= model.cos.size(1) runs full attention, one more token does not (None); the MC
    tree of that long a history needs LOD2 (gistnet.AnyLevel) to fit w_max."""
    model, gistnet, lensnet, cfg = tiny(w_max=128)
    table = model.cos.size(1)  # 10 x sequence_len = 2560
    histories = [torch.randint(0, V, (table - 2,)), torch.randint(0, V, (table - 1,))]
    answers = [torch.randint(0, V, (2,))] * 2
    records, levels = measure_retrieval(model, gistnet, lensnet, cfg, histories, answers, refocus_iters=1)
    assert records["full"][0] is not None and records["full"][1] is None
    assert all(r is not None for m in ("megacontext", "truncation") for r in records[m])
    assert levels == [2, 2]  # LOD1 alone: 78 gists + 62 raw tokens > 128 slots


def test_the_verdict_and_cell_means_average_over_depths():
    cells = {"0.1": dict(acc=1.0, nll=0.5), "0.9": dict(acc=0.5, nll=1.5)}
    results = {"megacontext": {"8": cells}, "truncation": {"8": {"0.1": dict(acc=0.0, nll=3.0)}}, "full": {"8": None}}
    assert cell_mean([cells], "acc") == 0.75 and cell_mean([cells, None], "nll") == 1.0 and cell_mean([None], "acc") is None
    assert recall_verdict(results, "passkey", 8) == ("MegaContext recalls 75% over histories of 8x W_max on passkey, facts at "
                                                     "depths 0.1-0.9 (truncation 0%, full n/a)")
    results["full"]["8"] = {"0.1": dict(acc=0.25, nll=2.0)}  # full attention itself fails: the verdict says so
    assert recall_verdict(results, "passkey", 8).endswith("(truncation 0%, full 25%): full attention recalls under half, so "
                                                          "this model has not learned the task (or its training diverged: "
                                                          "its train log) and the comparison says nothing about MegaContext")
    results["full"]["8"] = {"0.1": dict(acc=0.5, nll=2.0)}
    assert recall_verdict(results, "passkey", 8).endswith("full 50%)")
