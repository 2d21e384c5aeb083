import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import jitter
from nanochat.common import UserError
from nanochat.gpt import GPT, GPTConfig
from nanochat.megacontext.config import MegaContextConfig
from nanochat.megacontext.checkpoint import build_modules
from nanochat.megacontext.allocator import FocusAllocator
from nanochat.megacontext.evaluation import (evaluate_sequences, gap_closed, measure_sequences, refocus,
                                             spearman, summarize, validate)
from nanochat.megacontext.horizon import build_source
from nanochat.megacontext.working_context import WorkingContext

V = 256
MC_TINY = ["--depth", "2", "--aspect-ratio", "32", "--head-dim", "32", "--max-seq-len", "256", "--window-pattern", "SL",
           "--device-batch-size", "1", "--total-batch-size", "256", "--eval-tokens", "256", "--core-metric-every", "-1",
           "--sample-every", "-1", "--warmup-steps", "1", "--device-type", "cpu", "--eval-every", "-1"]
MC_FLAGS = ["--megacontext", "--mc-w-max", "64", "--mc-horizon", "32", "--mc-recent-tokens", "32", "--mc-max-level", "1",
            "--mc-gist-layers", "1", "--mc-lens-layers", "1", "--mc-lens-hidden", "64"]


def tiny(max_level=1, w_max=64, seed=0, **mc):
    """A real GPT (n_embd 64, 2 layers) with weights jittered off the init (whose zero projections
    would make every layer a no-op), and fresh GistNet / LensNet."""
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=256, vocab_size=V, n_layer=2, n_head=2, n_kv_head=2, n_embd=64, window_pattern="SL")
    model = GPT(config)
    model.init_weights()
    jitter(model.parameters(), 0.05)
    cfg = MegaContextConfig(w_max=w_max, max_level=max_level, recent_tokens=32, horizon=32, gist_layers=1, lens_layers=1,
                            lens_hidden=64, **mc).validate()
    gistnet, lensnet = build_modules(cfg, config)
    return model, gistnet, lensnet, cfg


def loud(lensnet, gain=50.0):
    """Saturate LensNet's tanh so that most entries score beyond the allocator's thresholds."""
    with torch.no_grad():
        lensnet.head.weight.mul_(gain)
    return lensnet


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


def test_refocus_stops_when_there_is_no_edit():
    model, gistnet, lensnet, cfg = tiny(w_max=128)
    source = build_source(model, gistnet, torch.randint(0, V, (600,)), cfg.max_level)
    start = WorkingContext.coarsest(source, cfg.recent_tokens, cfg.max_level)
    with torch.no_grad():
        lensnet.head.weight.zero_()  # every score 0: inside both thresholds, no candidate
        wc, edits = refocus(model, lensnet, FocusAllocator.from_config(cfg), start, source, iterations=5)
    assert wc == start and edits == [[]]
    loud(lensnet)
    with torch.no_grad():
        lensnet.head.weight.normal_(std=10.0)  # large scores of both signs
        wc, edits = refocus(model, lensnet, FocusAllocator.from_config(cfg), start, source, iterations=50)
    assert edits[0] and wc != start and wc.cost <= cfg.w_max
    assert len(edits) == 50 or edits[-1] == []  # ran out of iterations, or stopped at the first idle one
    assert all(step for step in edits[:-1])  # no idle iteration before the last


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
    from scripts.mc_eval import gist_first_quality
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


def test_cli_end_to_end(base_dir):
    from scripts import base_train, mc_eval
    base_train.main(MC_TINY + MC_FLAGS + ["--mc-w-max", "128", "--megaprediction", "--num-iterations", "2", "--model-tag", "mc_eval_mc"])
    report = mc_eval.main(["--model-tag", "mc_eval_mc", "--device-type", "cpu", "--history-mult", "2", "--num-docs", "2",
                           "--refocus-iters", "2", "--audit-edits", "3", "--gist-first-docs", "1"])
    out = base_dir / "mc_eval" / "mc_eval_mc_step2.json"
    data = json.loads(out.read_text())
    assert (base_dir / "mc_eval" / "mc_eval_mc_step2.png").stat().st_size > 1000
    assert data["step"] == 2 and data["history_tokens"] == 256 and data["horizon"] == 32
    assert set(data["results"]) == {"val", "longrange", "overall"}
    for src, r in data["results"].items():
        assert r["n"] == (4 if src == "overall" else 2)
        assert r["budget_violations"] == 0 and r["wc_util"] <= 1
        for key in ("nll_trunc", "nll_mc", "nll_full", "gap_closed", "dnll_lod1", "gist_cos_lod1", "audit_edits"):
            assert key in r, (src, key)
    assert data["results"]["longrange"]["n_answer"] == 2 and "ans_gap_closed" in data["results"]["longrange"]
    assert [p["mult"] for p in data["by_history"]] == [1, 2]
    assert data["by_history"][-1]["overall"]["nll_mc"] == data["results"]["overall"]["nll_mc"]
    assert report["results"]["overall"]["n"] == 4
    gist_first = data["gist_first"]  # the run trained MegaPrediction readouts: gist-first vs token-first was measured
    assert gist_first["docs"] == 1 and gist_first["scored_tokens"] == 128
    assert math.isfinite(gist_first["nll_gist_first"]) and math.isfinite(gist_first["nll_token_first"])
    section = (base_dir / "report" / "megacontext-evaluation.md").read_text()
    assert "gap_closed" in section


def test_vanilla_checkpoint_is_a_user_error(base_dir):
    from scripts import base_train, mc_eval
    base_train.main(MC_TINY + ["--num-iterations", "1", "--model-tag", "mc_eval_vanilla"])
    with pytest.raises(UserError, match="vanilla checkpoint") as e:
        mc_eval.main(["--model-tag", "mc_eval_vanilla", "--device-type", "cpu", "--num-docs", "1"])
    assert "\n" not in str(e.value)


# -----------------------------------------------------------------------------
# retrieval (--task)

def greedy(model, ids, n):
    """The model's own greedy continuation of ids, n tokens (vanilla forward): an answer it gets right."""
    ids = ids.clone()
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids[None])[0, -1].argmax()[None]])
    return ids[-n:]


def test_retrieval_accuracy_on_known_answers():
    """Answers the model predicts greedily are retrieved, one wrong token is not; full reads only the
    receptive field of a 600-token history and still matches the vanilla forward of the whole of it."""
    from nanochat.megacontext.evaluation import measure_retrieval, receptive_field, retrieval_summary
    model, gistnet, lensnet, cfg = tiny(w_max=128)
    assert receptive_field(model) == 128 + 256 + 2 < 600  # windows S=128, L=256, the smear, the last token
    history = torch.randint(0, V, (600,))
    right3, right1 = greedy(model, history, 3), greedy(model, history, 1)
    wrong3 = right3.clone()
    wrong3[-1] = (wrong3[-1] + 1) % V
    records, levels = measure_retrieval(model, gistnet, lensnet, cfg, [history] * 3, [right3, wrong3, right1], refocus_iters=2)
    assert [r["correct"] for r in records["full"]] == [True, False, True] and levels == [1, 1, 1]
    with torch.no_grad():
        logits = model(torch.cat([history, wrong3])[None, :-1])[0, -3:]  # (3, V): the slots that predict the answer
    assert records["full"][1]["nll"] == pytest.approx(F.cross_entropy(logits, wrong3).item(), abs=1e-4)
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


def test_the_fact_raw_probe_says_whether_the_mc_wc_holds_the_fact_block_raw():
    """fact_raw: the answer's value (its tokens but the last) stated in a block the recency-filled WC keeps
    raw (the newest) -> True, in an old block it holds as a gist -> False, nowhere -> None (not counted)."""
    from nanochat.megacontext.evaluation import measure_retrieval, retrieval_summary
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
    from nanochat.megacontext.evaluation import measure_retrieval
    model, gistnet, lensnet, cfg = tiny(w_max=128)
    table = model.cos.size(1)  # 10 x sequence_len = 2560
    histories = [torch.randint(0, V, (table - 2,)), torch.randint(0, V, (table - 1,))]
    answers = [torch.randint(0, V, (2,))] * 2
    records, levels = measure_retrieval(model, gistnet, lensnet, cfg, histories, answers, refocus_iters=1)
    assert records["full"][0] is not None and records["full"][1] is None
    assert all(r is not None for m in ("megacontext", "truncation") for r in records[m])
    assert levels == [2, 2]  # LOD1 alone: 78 gists + 62 raw tokens > 128 slots


def test_retrieval_cli_end_to_end(base_dir, capsys):
    from scripts import base_train, mc_eval
    base_train.main(MC_TINY + MC_FLAGS + ["--num-iterations", "1", "--model-tag", "mc_eval_retrieval"])
    report = mc_eval.main(["--model-tag", "mc_eval_retrieval", "--device-type", "cpu", "--task", "retrieval", "--mults", "4,41",
                           "--depths", "0.25,0.75", "--num-docs", "2", "--refocus-iters", "1"])
    data = json.loads((base_dir / "mc_eval" / "mc_eval_retrieval_step1_retrieval.json").read_text())
    assert (base_dir / "mc_eval" / "mc_eval_retrieval_step1_retrieval.png").stat().st_size > 1000
    assert data["tasks"] == ["passkey", "kv-recall", "needle"] and data["mults"] == [4, 41] and data["depths"] == [0.25, 0.75]
    assert set(data["results"]) == set(data["tasks"]) and data["mc_levels"] == {"4": 1, "41": 2}
    assert data["chance"]["passkey"] == pytest.approx(1 / 90000)  # pass keys 10000..99999
    for task, methods in data["results"].items():
        assert set(methods) == {"megacontext", "truncation", "full"} and 0 < data["chance"][task] < 1e-4
        for method, by_mult in methods.items():
            assert set(by_mult) == {"4", "41"}
            if method == "full":  # 41 x 64 = 2624 history tokens > the rotary table of 2560
                assert by_mult["41"] is None and "rotary table" in data["full_skipped"][task]["41"]
            for mult, by_depth in by_mult.items():
                if by_depth is None:
                    continue
                assert set(by_depth) == {"0.25", "0.75"}
                for cell in by_depth.values():
                    assert cell["n"] == 2 and 0 <= cell["acc"] <= 1 and cell["nll"] > 0
    assert "4" not in data["full_skipped"]["passkey"] and report["results"] == data["results"]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the last line: 41x (no 16x), averaged
    assert summary["mult"] == 41 and summary["acc_full"] is None and 0 <= summary["acc_megacontext"] <= 1
    cells = [c for task in data["tasks"] for c in data["results"][task]["truncation"]["41"].values()]
    assert summary["nll_truncation"] == pytest.approx(sum(c["nll"] for c in cells) / len(cells))


def test_passkey_verdict_and_probes(base_dir, capsys):
    """--task passkey at 8x: the one-line verdict (the depth-averaged accuracies, in the JSON and on stdout)
    and the probes: fact_raw in each MegaContext cell, the digit probe of the fact blocks' gists."""
    from scripts import base_train, mc_eval
    base_train.main(MC_TINY + MC_FLAGS + ["--num-iterations", "1", "--model-tag", "mc_eval_verdict"])
    mc_eval.main(["--model-tag", "mc_eval_verdict", "--device-type", "cpu", "--task", "passkey", "--mults", "8",
                  "--depths", "0.25,0.75", "--num-docs", "2", "--refocus-iters", "1", "--probe-docs", "8"])
    data = json.loads((base_dir / "mc_eval" / "mc_eval_verdict_step1_passkey.json").read_text())
    cells = data["results"]["passkey"]
    acc = {m: sum(c["acc"] for c in cells[m]["8"].values()) / 2 for m in ("megacontext", "truncation", "full")}
    pct = lambda a: f"{100 * a:.0f}%"
    verdict = (f"MegaContext recalls {pct(acc['megacontext'])} at 8x W_max on passkey "
               f"(truncation {pct(acc['truncation'])}, full {pct(acc['full'])})")
    assert data["verdicts"] == [verdict] and verdict in capsys.readouterr().out
    assert all(0 <= c["fact_raw"] <= 1 for c in cells["megacontext"]["8"].values())
    probes = data["probes"]
    assert probes["n"] >= 4 and len(probes["gist"]) == len(probes["mean"]) == 5
    assert all(0 <= a <= 1 for a in probes["gist"] + probes["mean"])


@pytest.mark.parametrize("flags,message", [(["--task", "recall"], "unknown --task"), (["--depths", "0,0.5"], "between 0 and 1"),
                                           (["--depths", "0.5,1"], "between 0 and 1"), (["--depths", "a,b"], "comma-separated"),
                                           (["--mults", "0,4"], "at least 1"), (["--mults", "2.5"], "comma-separated")])
def test_retrieval_bad_flags(flags, message):
    from scripts import mc_eval
    argv = flags if flags[0] == "--task" else ["--task", "passkey"] + flags
    with pytest.raises(UserError, match=message) as e:
        mc_eval.main(argv)
    assert "\n" not in str(e.value)


def test_ck_task_end_to_end(base_dir):
    """--task ck: the fact memory is attached and read (its answers' NLL differ from the dropped run's),
    every asked fact gets a poison verdict, and edited facts are asked again with their new value."""
    from conftest import save_mc_checkpoint
    from scripts import mc_eval
    save_mc_checkpoint(base_dir, "ck_eval", noise=0.05)
    report = mc_eval.main(["--model-tag", "ck_eval", "--task", "ck", "--num-docs", "4", "--ck-entities", "5",
                           "--refocus-iters", "2", "--device-type", "cpu"])
    data = json.loads((base_dir / "mc_eval" / "ck_eval_step5_ck.json").read_text())
    assert data["questions"] == 4 and len(data["rows"]) == 4 and data["memory_tokens"] % 32 == 0
    rows = data["rows"]
    assert all(r["poison"] in ("session", "ck", "neither") and r["ck_slots"] > 0 for r in rows)
    assert any(abs(r["nll_ck"] - r["nll_drop"]) > 1e-4 for r in rows)  # the memory is in the working context
    assert data["ckri"] == pytest.approx((data["nll_drop"] - data["nll_full"]) / data["nll_full"])
    updated = [r for r in rows if r["update"] is not None]
    assert data["updated"] == len(updated) > 0 and all(r["update"]["new"] != r["value"] for r in updated)
    assert 0 <= data["update_followed"] <= 1 and report["acc_oracle"] == data["acc_oracle"]
