import os
import re
import sys
import json
import stat
import subprocess

import pytest

from nanochat.common import UserError, get_base_dir
from nanochat.report import get_report, SECTION_ORDER

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def base(tmp_path, monkeypatch):
    base = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # generate writes ./report.md here
    return base


def write_train_log(path, records, torn_tail=False):
    path.parent.mkdir(parents=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        if torn_tail:
            f.write('{"step": 99, "kind": "tr')  # a crash mid-line


def log_pipeline(report):
    # out of order on purpose, plus an extra section the pipeline does not know
    report.log(section="Chat evaluation sft", data=[{"ARC-Easy": 0.31, "MMLU": 0.27, "ChatCORE": 0.05, "Arithmetic": 0.5}])
    report.log(section="Notes", data=["a free-form remark"])
    report.log(section="Base model evaluation", data=[{"CORE": 0.1234, "val_bpb": 0.95}])
    report.log(section="Chat SFT", data=[{"num_iterations": 20}, {"wall_clock_s": 60.0}])
    report.log(section="Tokenizer training", data=[{"vocab_size": 512, "wall_clock_s": 5.0}])
    report.log(section="Base model training", data=[{"depth": 4, "val_bpb": 1.25, "wall_clock_s": 3600.0}, "trained on CPU"])
    report.log(section="Chat evaluation rl", data=[{"GSM8K": 0.125, "Spelling": 0.75, "ChatCORE-5": 0.07}])


def headings(markdown):
    return re.findall(r"^## (.+)$", markdown, flags=re.M)


def summary_rows(markdown):
    summary = markdown[markdown.index("## Summary"):]
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] != "Metric":
            rows[cells[0]] = cells[1:]
    return rows


def test_generate_orders_sections_and_summarizes(base):
    report = get_report()
    report.reset()
    log_pipeline(report)
    write_train_log(base / "base_checkpoints" / "d4" / "train_log.jsonl",
                    [{"step": s, "kind": "train", "loss": 5.0 - s / 10, "smooth_loss": 5.1 - s / 10, "tokens_seen": s * 64} for s in range(1, 21)]
                    + [{"step": s, "kind": "eval", "val_bpb": 2.0 - s / 40, "tokens_seen": s * 64} for s in (0, 10, 20)], torn_tail=True)
    write_train_log(base / "chatsft_checkpoints" / "d4" / "train_log.jsonl",
                    [{"step": s, "kind": "train", "loss": 2.0 - s / 50} for s in range(1, 11)] + [{"step": 10, "kind": "eval", "val_loss": 1.7}])
    path = report.generate()
    assert path == str(base / "report" / "report.md")

    text = open(path).read()
    assert open("report.md").read().replace("](../base/report/loss_curves.png)", "](loss_curves.png)") == text
    assert text.startswith("# nanochat training report")
    assert headings(text) == ["Environment", "Tokenizer training", "Base model training", "Base model evaluation",
                              "Chat SFT", "Chat evaluation sft", "Chat evaluation rl", "Notes", "Loss curves", "Summary"]
    assert "trained on CPU" in text and "a free-form remark" in text and "- depth: 4" in text
    assert text.index("## Summary") > text.index("## Loss curves")

    rows = summary_rows(text)
    assert rows == {
        "val bpb": ["0.9500", "-", "-"],  # the evaluation's value wins over the training's
        "CORE": ["0.1234", "-", "-"],
        "ARC-Easy": ["-", "0.3100", "-"],
        "MMLU": ["-", "0.2700", "-"],
        "GSM8K": ["-", "-", "0.1250"],
        "ChatCORE": ["-", "0.0500", "-"],
        "ChatCORE-5": ["-", "-", "0.0700"],
        "Arithmetic": ["-", "0.5000", "-"],
        "Spelling": ["-", "-", "0.7500"],
    }
    assert "Total wall clock time: 1h01m05s" in text

    png = base / "report" / "loss_curves.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "![loss curves](loss_curves.png)" in text
    link = re.search(r"!\[loss curves\]\((.+?)\)", open("report.md").read()).group(1)
    assert os.path.samefile(link, png)  # the ./report.md copy points at the same plot


def test_log_overwrites_section(base):
    report = get_report()
    report.log(section="Chat RL", data=[{"GSM8K": 0.1}])
    report.log(section="Chat RL", data=[{"GSM8K": 0.2}])
    files = sorted(os.listdir(base / "report"))
    assert files == ["chat-rl.md"]
    text = (base / "report" / "chat-rl.md").read_text()
    assert "- GSM8K: 0.2" in text and "0.1" not in text
    report.generate()
    assert summary_rows(open("report.md").read()) == {"GSM8K": ["-", "-", "0.2000"]}


def test_summary_without_metrics_and_without_curves(base):
    report = get_report()
    report.log(section="Tokenizer evaluation", data=[{"ratio": 4.2}])
    report.generate()
    text = open("report.md").read()
    assert "No summary metrics were logged." in text
    assert "Loss curves" not in text and "Total wall clock" not in text
    assert "## Environment" in text  # header made on the fly when reset was never run
    assert not (base / "report" / "loss_curves.png").exists()


def test_a_stage_whose_sections_name_other_models_is_flagged(base):
    """A base_train of one model and a base_eval of another shared the BASE column with no word of it."""
    report = get_report()
    report.log(section="Base model training", data=[{"model_tag": "exp_d3x128", "val_bpb": 1.5607}])
    report.log(section="Base model evaluation", data=[{"model_tag": "cpu_d3_mc", "val_bpb": 0.887}])
    report.log(section="Chat SFT", data=[{"model_tag": "cpu_d3_mc", "val_loss": 0.5}])
    report.generate()
    text = open("report.md").read()
    assert "Warning: the BASE column mixes models: exp_d3x128 (Base model training), cpu_d3_mc (Base model evaluation)" in text
    assert "SFT column mixes" not in text
    report.log(section="Base model training", data=[{"model_tag": "cpu_d3_mc", "val_bpb": 1.46}])
    report.generate()
    assert "mixes models" not in open("report.md").read()


def test_a_subset_chat_eval_has_its_own_section_and_only_fills_the_summarys_gaps(base):
    """chat_eval -a Spelling -x 1 (a smoke run) replaced the full run's section: the summary showed Spelling from one
    problem and lost the other tasks."""
    report = get_report()
    report.log(section="Chat evaluation sft", data=[{"model_tag": "d3", "Arithmetic": 1.0, "Spelling": 0.4}])
    report.log(section="Chat evaluation sft: Spelling (1 problems each)", data=[{"model_tag": "d3", "Spelling": 0.0}])
    report.log(section="Chat evaluation sft: GSM8K (5 problems each)", data=[{"model_tag": "d3", "GSM8K": 0.2}])
    report.generate()
    text = open("report.md").read()
    assert "## Chat evaluation sft\n" in text and "## Chat evaluation sft: Spelling (1 problems each)" in text
    rows = summary_rows(text)
    assert rows["Spelling"][1] == "0.4000" and rows["Arithmetic"][1] == "1.0000" and rows["GSM8K"][1] == "0.2000"


def test_other_ranks_write_nothing(base, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    report = get_report()
    report.reset()
    assert report.log(section="Base model training", data=[{"val_bpb": 1.0}]) is None
    assert report.generate() is None
    assert not (base / "report").exists()
    assert not os.path.exists("report.md")


def test_reset_clears_old_sections(base):
    report = get_report()
    log_pipeline(report)
    write_train_log(base / "base_checkpoints" / "d4" / "train_log.jsonl", [{"step": 1, "kind": "train", "loss": 3.0}])
    report.generate()
    assert (base / "report" / "loss_curves.png").exists()
    report.reset()
    assert sorted(os.listdir(base / "report")) == ["header.md"]
    header = (base / "report" / "header.md").read_text()
    for field in ("git commit:", "CPUs:", "RAM:", "GPU:", "Python:", "PyTorch:"):
        assert field in header
    assert f"- CPUs: {os.cpu_count()}" in header


def test_section_order_is_the_pipeline(base):
    report = get_report()
    for section in reversed(SECTION_ORDER):
        report.log(section=section, data=[{"x": 1}])
    report.generate()
    assert headings(open("report.md").read())[1:-1] == SECTION_ORDER


def test_nothing_to_report(base):
    get_report().reset()  # a header alone is not a report
    with pytest.raises(UserError, match="nothing to report"):
        get_report().generate()
    with pytest.raises(UserError):
        get_report().log(section="report", data=[])  # would clobber report.md


def test_cli(base):
    env = {**os.environ, "PYTHONPATH": REPO}
    run = lambda cmd: subprocess.run([sys.executable, "-m", "nanochat.report", cmd], env=env, capture_output=True, text=True, timeout=120)
    r = run("generate")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: nothing to report")
    assert run("reset").returncode == 0
    get_report().log(section="Chat SFT", data=[{"val_bpb": 0.5}])
    r = run("generate")
    assert r.returncode == 0, r.stderr
    assert "| val bpb | - | 0.5000 | - |" in open("report.md").read()
    os.makedirs("outdir")  # a directory for -o was a traceback after report.md had been written
    r = subprocess.run([sys.executable, "-m", "nanochat.report", "generate", "-o", "outdir"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "-o outdir is a directory" in r.stderr.strip().splitlines()[-1] and "Traceback" not in r.stderr
    open("afile", "w").close()  # -o under a file: a traceback after report.md had been rewritten
    before = os.path.getmtime(os.path.join(get_report().report_dir, "report.md"))
    r = subprocess.run([sys.executable, "-m", "nanochat.report", "generate", "-o", "afile/sub/report.md"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "is not a directory" in r.stderr.strip().splitlines()[-1] and "Traceback" not in r.stderr
    assert os.path.getmtime(os.path.join(get_report().report_dir, "report.md")) == before


def test_damaged_inputs_are_read_past_not_a_traceback(base):
    """A stray byte in a section, the header or a training log, or a folder named like a section: the
    report is still written (the byte shows as U+FFFD, the torn log line is skipped)."""
    report = get_report()
    report.reset()
    report.log(section="Chat SFT", data=[{"val_bpb": 0.5}])
    with open(os.path.join(report.report_dir, "chat-sft.md"), "ab") as f:
        f.write(b"- note: \xff\n")
    with open(os.path.join(report.report_dir, "header.md"), "ab") as f:
        f.write(b"\xfe\n")
    os.makedirs(os.path.join(report.report_dir, "notes.md"))
    log = os.path.join(get_base_dir(), "base_checkpoints", "d1", "train_log.jsonl")
    os.makedirs(os.path.dirname(log))
    with open(log, "wb") as f:
        f.write(b'{"step": 0, "kind": "train", "loss": 5.0, "tokens_seen": 0}\n{"step": 1, "kind": "tr\xff\x00')
    report.generate()
    text = open("report.md", encoding="utf-8").read()
    assert "- note: \ufffd" in text and "| val bpb | - | 0.5000 | - |" in text and "## Loss curves" in text


def test_an_sft_models_base_evaluation_has_its_own_section_and_column(base):
    """base_eval --source sft logged under the base model's section: the SFT model's val bpb replaced the base's,
    in the BASE column."""
    report = get_report()
    report.log(section="Base model evaluation", data=[{"val_bpb": 0.95}])
    report.log(section="Base model evaluation sft", data=[{"val_bpb": 1.10}])
    report.generate()
    text = open("report.md").read()
    assert summary_rows(text)["val bpb"] == ["0.9500", "1.1000", "-"]
    assert "## Base model evaluation" in text and "## Base model evaluation sft" in text


def test_recall_curves_are_plotted_from_the_training_logs(base):
    from nanochat.report import collect_recall_curves
    eval_rec = lambda step, **recall: dict(step=step, kind="eval", tokens_seen=step * 4096, **{f"recall/{k}": v for k, v in recall.items()})
    write_train_log(base / "base_checkpoints" / "recall_mc" / "train_log.jsonl",
                    [eval_rec(0, full=0.0, truncation=0.0, megacontext=0.0), dict(step=1, kind="train", loss=2.0),
                     eval_rec(100, full=0.9, truncation=0.05, megacontext=0.6)])
    write_train_log(base / "base_checkpoints" / "plain" / "train_log.jsonl", [dict(step=0, kind="eval", val_bpb=2.0)])
    curves = collect_recall_curves(str(base))
    assert [(label, method) for label, method, _ in curves] == [("recall_mc", m) for m in ("megacontext", "truncation", "full")]
    assert curves[0][2] == [(0, 0.0), (409600, 0.6)]
    get_report().generate()
    assert "## Recall curves" in open("report.md").read() and (base / "report" / "recall_curves.png").exists()
    os.remove(base / "base_checkpoints" / "recall_mc" / "train_log.jsonl")
    get_report().generate()  # no recall logged any more: no section, no stale plot
    assert "## Recall curves" not in open("report.md").read() and not (base / "report" / "recall_curves.png").exists()


def test_generate_writes_through_a_link_or_a_pipe_instead_of_replacing_it(base, tmp_path):
    """-o link.md replaced the link by a file (target unchanged); as root -o /dev/stdout would have replaced /dev/stdout."""
    import threading
    report = get_report()
    report.reset()
    log_pipeline(report)
    (tmp_path / "target.md").write_text("old")
    os.symlink(tmp_path / "target.md", tmp_path / "link.md")
    report.generate(str(tmp_path / "link.md"))
    assert os.path.islink(tmp_path / "link.md")
    assert (tmp_path / "target.md").read_text().startswith("# nanochat training report")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()), daemon=True)
    reader.start()
    report.generate(str(fifo))
    reader.join(timeout=30)
    assert got and got[0].startswith("# nanochat training report")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
