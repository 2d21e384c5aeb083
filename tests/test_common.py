import os
import stat
import contextlib

import pytest

from nanochat.common import (atomic_path, atomic_write_json, check_digest, cli_main, commit_with_digest, UserError, compute_cleanup,
                             compute_dtype, get_dist_info, orthogonalize_dtype)


def test_atomic_path_replaces_on_success_and_keeps_old_on_failure(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_json({"a": 1}, str(target))
    assert target.read_text().strip().startswith("{") and '"a": 1' in target.read_text()
    assert stat.S_IMODE(os.stat(target).st_mode) & 0o044  # not left at mkstemp's 0600
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("crash mid-write")
    assert '"a": 1' in target.read_text()
    assert os.listdir(tmp_path) == ["f.json"]  # no temp file left behind


def test_a_digest_is_never_left_describing_other_bytes(tmp_path):
    """commit_with_digest over an existing file: at every point a kill can strike (the old digest
    removed, the new file renamed, the new digest written) the file on disk is its digest's or has none."""
    path = str(tmp_path / "w.pt")

    def writer(text):
        def write(tmp):
            open(tmp, "w").write(text)
        return write
    commit_with_digest(writer("old"), path)
    check_digest(path, "file")
    open(path, "a").write("!")
    with pytest.raises(UserError, match=r"w.pt does not match its checksum in w.pt.sha256 \(.*if you replaced it on purpose, delete .*w.pt.sha256\)$"):
        check_digest(path, "file")
    commit_with_digest(writer("old"), path)
    import nanochat.common as common
    real_replace, seen = os.replace, []

    def crash_after(n):
        def replace(a, b):
            if len(seen) == n:
                raise KeyboardInterrupt  # a kill: nothing after it runs
            seen.append(b)
            real_replace(a, b)
        return replace
    for n in range(2):  # 0: before the new file takes the name, 1: before its digest does
        seen.clear()
        common.os.replace = crash_after(n)
        try:
            with pytest.raises(KeyboardInterrupt):
                commit_with_digest(writer(f"new {n}"), path)
        finally:
            common.os.replace = real_replace
        check_digest(path, "file")  # never a mismatch: the old file without its digest, or the new one without one
        assert open(path).read() == ("old" if n == 0 else f"new {n}") and not os.path.exists(path + ".sha256")
        commit_with_digest(writer("old"), path)


def test_cli_main_turns_user_errors_into_one_line(capsys):
    def main():
        raise UserError("no tokenizer at /x (run tok_train first)")
    with pytest.raises(SystemExit) as e:
        cli_main(main)
    assert e.value.code == 1
    assert capsys.readouterr().err == "error: no tokenizer at /x (run tok_train first)\n"


def test_compute_cleanup_meets_at_a_barrier_on_a_normal_exit_only(monkeypatch, tmp_path):
    # a normal exit waits at a barrier (so gloo's worker threads drop their last tensor references
    # before interpreter shutdown); an exception skips it (a dead peer would never arrive)
    import torch.distributed as dist
    calls = []
    real_barrier = dist.barrier
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: (calls.append("barrier"), real_barrier(*a, **k)))
    for failing in (False, True):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store_{failing}", rank=0, world_size=1)
        calls.clear()
        with pytest.raises(RuntimeError) if failing else contextlib.nullcontext():
            try:
                if failing:
                    raise RuntimeError("this rank failed")
            finally:
                compute_cleanup()
        assert calls == ([] if failing else ["barrier"])
        assert not dist.is_initialized()


def test_compute_dtype_env_override(monkeypatch):
    import torch
    assert compute_dtype("cpu") == torch.float32
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    assert compute_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv("NANOCHAT_DTYPE", "fp8")
    with pytest.raises(UserError):
        compute_dtype("cpu")


def test_orthogonalize_dtype_is_fp32_on_cpu_whatever_the_activation_dtype(monkeypatch):
    import torch
    assert orthogonalize_dtype("cpu") == torch.float32 and orthogonalize_dtype("mps") == torch.float32
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")  # bf16 activations on a CPU, as tests of the GPU path ask
    assert compute_dtype("cpu") == torch.bfloat16 and orthogonalize_dtype("cpu") == torch.float32


KEEP_FREED_PROBE = """
import resource, sys, torch
from nanochat.common import compute_init
from nanochat.gpt import GPT, GPTConfig
if sys.argv[1] == "1":
    compute_init("cpu")  # on a CPU this keeps freed memory in the heap (common.keep_freed_memory)
model = GPT(GPTConfig(sequence_len=256, vocab_size=8192, n_layer=1, n_head=1, n_kv_head=1, n_embd=64))
model.init_weights()
optimizers = model.setup_optimizers()
x = torch.randint(0, 8192, (8, 256))  # the (B*T, V) fp32 logits: 64 MiB, over glibc's 32 MiB mmap ceiling
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model(x, x).backward()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sorted(faults[4:])[4])  # the median of the last 8 steps: while the heap settles (mostly steps 1-3) a step may grow it by a buffer
"""


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="glibc malloc only")
def test_a_cpu_training_step_reuses_freed_memory_instead_of_faulting_it_in_again():
    import sys
    import subprocess
    faults = {}
    for on in ("0", "1"):
        r = subprocess.run([sys.executable, "-c", KEEP_FREED_PROBE, on], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        faults[on] = int(r.stdout.strip())
    # each 64 MiB logits-sized buffer is 16k pages: by default every step faults them all in again;
    # kept, a typical step faults none (now and then one grows the heap by a buffer while it settles)
    assert faults["0"] > 50000 and faults["1"] < 5000, faults


def test_an_unusable_base_dir_is_a_one_line_error(tmp_path, monkeypatch):
    """A file where NANOCHAT_BASE_DIR's parent should be: a NotADirectoryError traceback from every script."""
    from nanochat.common import get_base_dir
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "afile" / "base"))
    with pytest.raises(UserError, match=r"cannot use .*afile/base as the base directory \(NANOCHAT_BASE_DIR\): Not a directory$"):
        get_base_dir()


def test_malformed_torchrun_variables_are_one_line_errors(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert get_dist_info() == (True, 1, 0, 2)
    for value in ("0x", "", "-1"):
        monkeypatch.setenv("RANK", value)
        with pytest.raises(UserError, match=f"RANK={value!r}: torchrun's RANK, LOCAL_RANK and WORLD_SIZE must be integers"):
            get_dist_info()
    # a world of 0, a rank past the world, a cluster's RANK/WORLD_SIZE without torchrun's rendezvous: were tracebacks
    for rank, world in (("0", "0"), ("2", "2")):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", world)
        with pytest.raises(UserError, match=f"RANK={rank}, WORLD_SIZE={world}: torchrun's rank must be below a world size of 1 or more"):
            get_dist_info()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.delenv("MASTER_ADDR")
    with pytest.raises(UserError, match="RANK, LOCAL_RANK and WORLD_SIZE are set but MASTER_ADDR not: launch with torchrun"):
        get_dist_info()
    monkeypatch.delenv("WORLD_SIZE")
    assert get_dist_info() == (False, 0, 0, 1)
