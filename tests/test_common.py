import os
import stat

import pytest

from nanochat.common import atomic_path, atomic_write_json, cli_main, UserError, compute_dtype


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


def test_cli_main_turns_user_errors_into_one_line(capsys):
    def main():
        raise UserError("no tokenizer at /x (run tok_train first)")
    with pytest.raises(SystemExit) as e:
        cli_main(main)
    assert e.value.code == 1
    assert capsys.readouterr().err == "error: no tokenizer at /x (run tok_train first)\n"


def test_compute_dtype_env_override(monkeypatch):
    import torch
    assert compute_dtype("cpu") == torch.float32
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    assert compute_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv("NANOCHAT_DTYPE", "fp8")
    with pytest.raises(UserError):
        compute_dtype("cpu")
