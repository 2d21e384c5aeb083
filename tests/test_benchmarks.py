import os
import sys
import json
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_throughput_prints_one_json_line():
    r = subprocess.run([sys.executable, "-m", "benchmarks.train_throughput", "--depth", "1", "--max-seq-len", "64",
                        "--device-batch-size", "2", "--vocab-size", "256", "--steps", "2", "--warmup", "1", "--device-type", "cpu"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["benchmark"] == "train_throughput" and result["tok_per_sec"] > 0 and result["device"] == "cpu"
    assert result["mfu"] is None and result["max_seq_len"] == 64 and result["flops_per_token"] > 0
