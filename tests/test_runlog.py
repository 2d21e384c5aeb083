import json

import torch

from nanochat.runlog import RunLog, peak_flops, measured_matmul_flops


def test_jsonl_always_and_wandb_when_named(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    log = RunLog(str(tmp_path / "a" / "log.jsonl"), run="myrun", user_config={"depth": 2})
    assert log.wandb is not None
    log.write(step=1, kind="train", loss=2.5, mfu=None)
    log.write(step=2, kind="eval", val_bpb=1.25)
    log.finish()
    rows = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["kind"]) for r in rows] == [(1, "train"), (2, "eval")]
    assert rows[0]["loss"] == 2.5 and rows[1]["val_bpb"] == 1.25 and "time" in rows[0]


def test_dummy_run_has_no_wandb_and_disabled_rank_writes_nothing(tmp_path):
    log = RunLog(str(tmp_path / "log.jsonl"))
    assert log.wandb is None
    off = RunLog(str(tmp_path / "off.jsonl"), enabled=False)
    off.write(step=1, loss=1.0)
    assert not (tmp_path / "off.jsonl").exists()


def test_a_resumed_log_keeps_what_led_up_to_its_step_and_nothing_after(tmp_path):
    path = tmp_path / "log.jsonl"
    log = RunLog(str(path))
    log.write(step=0, kind="eval", val_bpb=3.0)
    for step in range(1, 7):  # a run that went on to step 6 after saving step 4
        log.write(step=step, kind="train", loss=float(step))
        if step % 2 == 0:
            log.write(step=step, kind="eval", val_bpb=1.0 / step)
        if step % 4 == 0:
            log.write(step=step, kind="core", core_metric=0.1 * step)
    with open(path, "a") as f:
        f.write('{"step": 7, "kind": "tr')  # a line cut by a crash
    RunLog(str(path), resume_step=4)  # resumed from step 4: it evaluates step 4 again, its CORE only past its start
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["kind"]) for r in rows] == [(0, "eval"), (1, "train"), (2, "train"), (2, "eval"), (3, "train"), (4, "train"),
                                                      (4, "core")]
    RunLog(str(path), resume_step=None)  # a fresh log object without a resume leaves the file as it is
    assert len(path.read_text().splitlines()) == 7


def test_a_record_after_a_torn_line_starts_its_own_line(tmp_path):
    """A crash cut the last line mid-record: the next run's first record must not be glued to it."""
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 0, "kind": "train", "loss": 9.0}\n{"step": 1, "kind": "tr')
    RunLog(str(path)).write(step=0, kind="train", loss=5.0)
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["loss"] == 5.0
    RunLog(str(path)).write(step=1, kind="train", loss=4.0)  # a log that ends its lines is left as it is
    assert len(path.read_text().splitlines()) == 4
    path.write_bytes(b'{"step": 0, "kind": "train", "loss": 9.0}\n{"step": 1, "kind": "tr\xff')
    RunLog(str(path), resume_step=1)  # torn bytes do not block a resume
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0]


def test_nan_and_inf_are_written_as_null_at_any_depth(tmp_path):
    """A diverging run's loss is inf: the record must stay strict JSON (no Infinity / NaN tokens)."""
    path = tmp_path / "log.jsonl"
    RunLog(str(path)).write(step=3, kind="train", loss=float("inf"), smooth=-float("inf"), parts=[1.0, float("nan")],
                            by_kind={"a": float("nan"), "b": 2.0})
    reject = lambda name: (_ for _ in ()).throw(ValueError(name))
    r = json.loads(path.read_text(), parse_constant=reject)
    assert (r["loss"], r["smooth"], r["parts"], r["by_kind"]) == (None, None, [1.0, None], {"a": None, "b": 2.0})


def test_peak_flops_unknown_off_gpu():
    assert peak_flops(torch.device("cpu")) is None


def test_peak_flops_matches_whole_words_and_variants_first(monkeypatch):
    """An L40 is not an L4 (its MFU came out 1.5x high), an H100 PCIe not the SXM part, an unlisted card unknown."""
    cards = {"NVIDIA L40": 181e12, "NVIDIA L40S": 362e12, "NVIDIA L4": 121e12, "NVIDIA H100 PCIe": 756e12,
             "NVIDIA H100 NVL": 835e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA GH200 480GB": 989e12, "NVIDIA T4": None}
    for name, flops in cards.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert peak_flops(torch.device("cuda", 0)) == flops, name


def test_measured_matmul_flops_is_2n3_over_the_fastest_product(monkeypatch):
    import nanochat.runlog as runlog
    ticks = iter([0.0, 0.5, 1.0, 1.25, 2.0, 2.75])  # products of 0.5, 0.25 and 0.75 s
    monkeypatch.setattr(runlog.time, "perf_counter", lambda: next(ticks))
    assert measured_matmul_flops("cpu", n=64, repeats=3) == 2 * 64**3 / 0.25
