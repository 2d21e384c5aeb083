"""
scripts/base_eval end to end, train-free: a tokenizer, two tiny parquet shards and a freshly
initialized tiny GPT saved as a checkpoint in a temp base dir; the CORE bundle is served
from 127.0.0.1. The script runs as a subprocess and its JSON is checked against the same
numbers computed in this process.
"""

import os
import sys
import json
import random
import shutil
import subprocess

import pytest
import torch
import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import atomic_torch_save
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer, compute_token_bytes
from nanochat.dataset import shard_filename
from nanochat.checkpoint_manager import save_checkpoint

from test_core_eval import BundleServer, build_bundle_zip, make_tasks

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG, STEP = "d2", 7
LABELS = {"mc_four", "mc_three", "schema_two", "schema_three", "lm_words", "lm_reverse"}


def make_corpus(n_docs, seed):
    rng = random.Random(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "from", "home", "today"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) + "." for _ in range(n_docs)]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("nanochat_base")
    tok_dir = base / "tokenizer"
    tokenizer = RustBPETokenizer.train_from_iterator(iter(make_corpus(200, seed=0)), 300)
    tokenizer.save(str(tok_dir))
    atomic_torch_save(compute_token_bytes(tokenizer), str(tok_dir / "token_bytes.pt"))
    data_dir = base / "base_data_climbmix"
    data_dir.mkdir()
    for i in range(2):  # shard 0 = train, shard 1 = val
        with pq.ParquetWriter(str(data_dir / shard_filename(i)), pa.schema([("text", pa.string())])) as writer:
            for g in range(2):
                writer.write_table(pa.table({"text": make_corpus(20, seed=10 * i + g + 1)}))
    config = GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    meta = dict(step=STEP, val_bpb=None, model_config=config.to_dict(), user_config={}, device_batch_size=2,
                max_seq_len=64, total_batch_size=128, dataloader_state_dict=dict(pq_idx=0, rg_idx=0, epoch=1),
                loop_state=dict(min_val_bpb=float("inf"), smooth_train_loss=0.0, total_training_time=0.0))
    save_checkpoint(str(base / "base_checkpoints" / TAG), STEP, model.state_dict(), None, meta)
    return base


def run_script(base, args, launcher=None, extra_env=None):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NANOCHAT_DATASET", "NANOCHAT_EVAL_BUNDLE_URL")}
    env.update(NANOCHAT_BASE_DIR=str(base), OMP_NUM_THREADS="1", **(extra_env or {}))
    cmd = (launcher or [sys.executable, "-m", "scripts.base_eval"]) + args
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


def in_process_reference(base, monkeypatch):
    """bpb (train, val) and greedy samples computed here with the library directly."""
    from nanochat.checkpoint_manager import load_model
    from nanochat.dataloader import bos_bestfit_loader
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import get_token_bytes
    from scripts.base_eval import SAMPLE_PROMPTS
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.delenv("NANOCHAT_DATASET", raising=False)
    model, tokenizer, _ = load_model("base", "cpu", phase="eval", model_tag=TAG, step=STEP)
    steps = 256 // (2 * 64)
    bpb = {split: evaluate_bpb(model, bos_bestfit_loader(tokenizer, 2, 64, split), steps, get_token_bytes())
           for split in ("train", "val")}
    bos = tokenizer.get_bos_token_id()
    samples = [tokenizer.decode(list(model.generate(tokenizer.encode(p, prepend=bos), 16, temperature=0))) for p in SAMPLE_PROMPTS]
    return bpb, samples


def test_end_to_end(base_dir, monkeypatch):
    with BundleServer(build_bundle_zip(make_tasks())) as server:
        proc = run_script(base_dir, ["--eval", "bpb,sample,core", "--bundle-url", server.url, "--device-type", "cpu",
                                     "--split-tokens", "256", "--device-batch-size", "2", "--max-per-task", "4"])
        assert proc.returncode == 0, proc.stderr
        assert server.requests == 1
        url = server.url
    out_path = base_dir / "base_eval" / f"{TAG}_{STEP}.json"
    results = json.loads(out_path.read_text())
    assert (results["source"], results["model_tag"], results["step"]) == ("base", TAG, STEP)

    bpb, samples = in_process_reference(base_dir, monkeypatch)
    assert results["bpb"] == pytest.approx(bpb, rel=1e-6)
    assert 1.0 < bpb["val"] < 100 and bpb["train"] != bpb["val"]
    assert [s["completion"] for s in results["samples"]] == samples

    core = results["core"]
    assert set(core["results"]) == LABELS and set(core["centered_results"]) == LABELS
    assert all(a in (0.0, 0.25, 0.5, 0.75, 1.0) for a in core["results"].values())  # 4 examples each
    assert core["core_metric"] == pytest.approx(sum(core["centered_results"].values()) / len(LABELS))
    assert "CORE metric" in proc.stdout and "val bpb" in proc.stdout

    # the bundle is now cached: a CORE-only rerun needs no server (the same URL, or none: the cached one), a
    # default-args run picks d2 / step 7, and the evals not run keep their figures for these same weights
    proc = run_script(base_dir, ["--eval", "core", "--bundle-url", url, "--max-per-task", "4"])
    assert proc.returncode == 0, proc.stderr
    again = json.loads(out_path.read_text())
    assert again["core"] == core and again["bpb"] == results["bpb"] and again["samples"] == results["samples"]
    assert "val_bpb" in (base_dir / "report" / "base-model-evaluation.md").read_text()
    # another URL is refused in one line (it scored the cached bundle's tasks under that URL's name)
    proc = run_script(base_dir, ["--eval", "core", "--bundle-url", "http://127.0.0.1:9/other.zip", "--max-per-task", "4"])
    assert proc.returncode == 1 and "came from" in proc.stderr and proc.stderr.count("\n") == 1
    os.utime(base_dir / "base_checkpoints" / TAG / f"model_{STEP:06d}.pt")  # a retrained checkpoint: other weights
    proc = run_script(base_dir, ["--eval", "core", "--max-per-task", "4"])
    assert proc.returncode == 0, proc.stderr
    again = json.loads(out_path.read_text())
    assert again["core"] == core and "bpb" not in again and "samples" not in again
    # the same weights as an SFT checkpoint (--source sft): its own report section, the base model's kept
    sft_dir = base_dir / "chatsft_checkpoints" / "evalsft"
    shutil.copytree(base_dir / "base_checkpoints" / TAG, sft_dir)
    try:
        proc = run_script(base_dir, ["--source", "sft", "--model-tag", "evalsft", "--eval", "bpb", "--split-tokens", "256",
                                     "--device-batch-size", "2"])
        assert proc.returncode == 0, proc.stderr
    finally:
        shutil.rmtree(sft_dir)
    sections = base_dir / "report"
    assert "CORE" in (sections / "base-model-evaluation.md").read_text()
    assert "val_bpb" in (sections / "base-model-evaluation-sft.md").read_text()


def test_torchrun_two_ranks_agree_with_one(base_dir):
    shutil.rmtree(base_dir / "eval_bundle", ignore_errors=True)  # cached from another test's server: fetched from this one
    (base_dir / "eval_bundle.zip").unlink(missing_ok=True)
    with BundleServer(build_bundle_zip(make_tasks())) as server:
        single = run_script(base_dir, ["--eval", "core", "--max-per-task", "5", "--model-tag", TAG],
                            extra_env=dict(NANOCHAT_EVAL_BUNDLE_URL=server.url))
        assert single.returncode == 0, single.stderr
        one = json.loads((base_dir / "base_eval" / f"{TAG}_{STEP}.json").read_text())
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "scripts/base_eval.py"]
        proc = run_script(base_dir, ["--eval", "core,bpb", "--max-per-task", "5", "--device-type", "cpu",
                                     "--split-tokens", "256", "--device-batch-size", "2"], launcher=launcher,
                          extra_env=dict(NANOCHAT_EVAL_BUNDLE_URL=server.url))
        assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((base_dir / "base_eval" / f"{TAG}_{STEP}.json").read_text())
    assert two["world_size"] == 2
    assert two["core"] == one["core"]  # examples split over ranks, counts summed
    assert proc.stdout.count("CORE metric") == 1  # only rank 0 prints the table


@pytest.mark.parametrize("args, needle", [
    (["--model-tag", "d99"], "d99"),
    (["--step", "123"], "model_000123.pt"),
    (["--eval", "core,vibes"], "--eval"),
    (["--eval", "recall", "--recall-docs", "0"], "--recall-docs"),
])
def test_user_errors_are_one_line(base_dir, args, needle):
    proc = run_script(base_dir, args + ["--device-type", "cpu"], launcher=[sys.executable, "scripts/base_eval.py"])
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


@pytest.mark.parametrize("bands", ["30-10", "100-5000"])
def test_bad_recall_bands_are_refused_before_any_eval_runs(base_dir, bands):
    """Bands were read after bpb and the samples had run (an hour at the default --split-tokens on a
    big model), and the refusal threw those results away."""
    proc = run_script(base_dir, ["--eval", "bpb,sample,recall", "--recall-bands", bands, "--split-tokens", "256",
                                 "--device-batch-size", "2", "--device-type", "cpu"], launcher=[sys.executable, "scripts/base_eval.py"])
    assert proc.returncode != 0 and "--recall-bands" in proc.stderr and "Traceback" not in proc.stderr
    assert "bpb" not in proc.stdout


def test_missing_checkpoint_and_tokenizer(tmp_path):
    proc = run_script(tmp_path, ["--eval", "bpb"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "checkpoints" in lines[0], proc.stderr


def test_missing_tokenizer(base_dir, tmp_path):
    shutil.copytree(base_dir / "base_checkpoints", tmp_path / "base_checkpoints")
    proc = run_script(tmp_path, ["--eval", "sample"])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "tokenizer" in lines[0], proc.stderr
