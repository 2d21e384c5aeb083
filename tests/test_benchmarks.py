import math
import os
import sys
import json
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_benchmark(module, *args):
    """Run `python -m benchmarks.<module> args...`; -> its stdout lines, each parsed as JSON."""
    r = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.strip().splitlines()]


def test_train_throughput_prints_one_json_line():
    lines = run_benchmark("train_throughput", "--depth", "1", "--max-seq-len", "64", "--device-batch-size", "2",
                          "--vocab-size", "256", "--steps", "2", "--warmup", "1", "--device-type", "cpu")
    assert len(lines) == 1
    result = lines[0]
    assert result["benchmark"] == "train_throughput" and result["tok_per_sec"] > 0 and result["device"] == "cpu"
    assert result["mfu"] is None and result["max_seq_len"] == 64 and result["flops_per_token"] > 0
    # on a CPU: this machine's own matmul rate in the training's dtype, measured in the run, is the MFU denominator
    assert result["cpu_matmul_gflops"] > 0 and result["cpu_capability"] and result["dtype"] == "float32"
    achieved = result["flops_per_token"] * result["tok_per_sec"]
    assert math.isclose(result["cpu_mfu"], achieved / (result["cpu_matmul_gflops"] * 1e9), rel_tol=0.01, abs_tol=1e-4)


def test_mc_core_prints_ingest_and_refocus_lines_for_ram_and_disk():
    lines = run_benchmark("mc_core", "--histories", "3000,40000", "--w-max", "256,1024", "--dim", "16", "--vocab-size", "256",
                          "--repeats", "2", "--disk-from", "40000")
    ingest = [x for x in lines if x["benchmark"] == "mc_ingest"]
    refocus = [x for x in lines if x["benchmark"] == "mc_refocus"]
    assert [(x["history"], x["storage"]) for x in ingest] == [(3000, "ram"), (40000, "disk")]
    assert ingest[1]["tree_disk_mb"] > 0 and all(x["tokens_per_sec"] > 0 for x in ingest)
    assert len(refocus) == 4 and all(x["wc_cost"] <= x["w_max"] and x["slots"] == x["wc_cost"] for x in refocus)
    assert all(x["wc_cost"] > x["w_max"] - 32 for x in refocus)  # the budget is filled before timing


def test_mc_train_throughput_prints_one_json_line_comparing_the_twins():
    lines = run_benchmark("mc_train_throughput", "--depth", "1", "--aspect-ratio", "64", "--head-dim", "64", "--max-seq-len", "160",
                          "--device-batch-size", "2", "--vocab-size", "256", "--steps", "1", "--warmup", "1", "--device-type", "cpu",
                          "--megacontext", "--mc-w-max", "64", "--mc-horizon", "32", "--mc-recent-tokens", "32", "--mc-gist-layers", "1",
                          "--mc-lens-layers", "1", "--mc-lens-hidden", "32", "--mc-anneal-frac", "0.05")
    assert len(lines) == 1
    result = lines[0]
    assert result["benchmark"] == "mc_train_throughput" and result["w_max"] == 64 and result["max_seq_len"] == 160
    assert result["vanilla_tok_per_sec"] > 0 and result["mc_tok_per_sec"] > 0 and result["cpu_capability"]  # the ISA the kernels ran
    assert result["ratio"] == round(result["mc_tok_per_sec"] / result["vanilla_tok_per_sec"], 3)
    # the MegaContext step does more matmul work than the vanilla one; the bound is their FLOP ratio
    assert result["mc_step_gflop"] > result["vanilla_step_gflop"] > 0
    assert math.isclose(result["flop_bound_ratio"], result["vanilla_step_gflop"] / result["mc_step_gflop"], rel_tol=0.02)
    # the annealing midpoint's budget is halfway from the history (160 - 32) to w_max 64, up to a whole 32-token block
    # (annealing over 5% of a 100-step grid, the midpoint was step 2 of 5: 128)
    assert 96 <= result["anneal_mid_budget"] < 96 + 32


def test_cpu_attention_is_counted_like_the_cuda_kernels():
    """On a CPU, scaled_dot_product_attention runs an op torch's FlopCounterMode has no formula for: the benchmark's
    mapping counts it, forward and backward, as 4 and 8 x B*H*Tq*Tk*D (grouped-query K/V included)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode
    sys.path.insert(0, REPO)
    from benchmarks.mc_train_throughput import CPU_ATTENTION_FLOPS
    B, H, Hkv, T, D = 2, 4, 2, 48, 16
    q = torch.randn(B, H, T, D, requires_grad=True)
    k, v = (torch.randn(B, Hkv, T, D, requires_grad=True) for _ in range(2))
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
    assert counter.get_total_flops() == 12 * B * H * T * T * D
    with FlopCounterMode(display=False) as bare:  # what the benchmark counted before: nothing
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
    assert bare.get_total_flops() == 0


def test_mc_inference_prints_one_json_line_with_flat_cost_rows(tmp_path):
    (tmp_path / "tree_300").mkdir()
    (tmp_path / "tree_300" / "session.json").write_text("{}")  # what a killed run left: it blocked every later run
    lines = run_benchmark("mc_inference", "--histories", "5000,300", "--decode", "32", "--warmup", "8", "--w-max", "128",
                          "--workdir", str(tmp_path),
                          "--vanilla-max-gib", "1", "--depth", "1", "--aspect-ratio", "64", "--head-dim", "64", "--max-seq-len", "256",
                          "--vocab-size", "256", "--device-type", "cpu", "--megacontext", "--mc-w-max", "128", "--mc-max-level", "1",
                          "--mc-recent-tokens", "32", "--mc-gist-layers", "1", "--mc-lens-layers", "1", "--mc-lens-hidden", "32")
    assert len(lines) == 1
    result = lines[0]
    rows = result["histories"]
    assert result["benchmark"] == "mc_inference" and [r["history"] for r in rows] == [300, 5000]  # given 5000,300: sorted
    assert all(r["mc_ms_per_token"] > 0 and r["wc_cost"] <= 128 and r["unreachable_tokens"] == 0 for r in rows)
    assert rows[1]["tree_levels"] == 2 and rows[1]["tree_disk_mb"] > rows[0]["tree_disk_mb"]  # LOD2 past the trained LOD1
    assert rows[0]["vanilla_ms_per_token"] > 0 and rows[1]["vanilla_ms_per_token"] is None  # 5000 > the rotary table (2560)
    assert "rotary" in rows[1]["vanilla_note"]
    assert result["ratio_1m_1k"] == round(rows[1]["mc_ms_per_token"] / rows[0]["mc_ms_per_token"], 3)


def test_gpu_check_runs_every_part_and_tags_each_json_line():
    """benchmarks/gpu_check.sh --smoke: the GPU node's script at toy sizes on this CPU, every part."""
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--smoke"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert [x["check"] for x in lines] == ["vanilla", "vanilla_mask", "megacontext", "decode"]
    assert all("error" not in x and x["wall_s"] > 0 for x in lines), lines
    vanilla, mask, mc, decode = lines
    assert vanilla["benchmark"] == mask["benchmark"] == "train_throughput" and mask["windowed_attention"] == "sdpa_mask"
    assert vanilla["windowed_attention"] == "sdpa_mask"  # a CPU takes the mask path unless NANOCHAT_FLEX=1
    assert mc["ratio"] > 0 and decode["ratio_1m_1k"] > 0 and len(decode["histories"]) == 2


def test_gpu_check_without_its_interpreter_says_so_and_fails():
    """With PYTHON naming no interpreter every part failed and so did the error reporter: nothing printed, exit 0."""
    env = {**os.environ, "PYTHON": "python_not_installed"}
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--smoke"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "" and r.stderr == "gpu_check: no Python interpreter 'python_not_installed' (set PYTHON)\n"


def test_bad_flags_are_one_line_errors_before_anything_is_timed():
    """A batch of 0 printed a result of 0 tok/s; --steps 0, --vocab-size 0, --dim 0, --chunk 0 and the like ended
    in tracebacks after building the model; --compile 5 was ignored."""
    cases = [("train_throughput", "--steps", "0"), ("train_throughput", "--device-batch-size", "0"),
             ("train_throughput", "--vocab-size", "0"), ("train_throughput", "--compile", "5"),
             ("mc_train_throughput", "--config", "configs/cpu_tiny_mc.toml", "--steps", "0"),
             ("mc_core", "--histories", "abc"), ("mc_core", "--dim", "0"), ("mc_core", "--chunk", "0"),
             ("mc_core", "--histories", "3000", "--w-max", "256", "--dim", "18", "--gist-kind", "transformer"),
             ("mc_inference", "--config", "configs/cpu_tiny_mc.toml", "--warmup", "-5"),
             ("mc_inference", "--config", "configs/cpu_tiny_mc.toml", "--workdir", "/no/such/dir"),
             ("mc_inference", "--config", "configs/cpu_tiny_mc.toml", "--histories", "1000,1000")]
    for module, *args in cases:
        r = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args, *(["--device-type", "cpu"] if module != "mc_core" else [])],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and "Traceback" not in r.stderr and "error: " in lines[-1], (module, args, r.stderr[-500:])
        assert r.stdout.strip() == "", (module, args)  # no result line
