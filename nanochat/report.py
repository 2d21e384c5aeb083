"""
The report card of a run. Each pipeline stage logs one markdown section under <base>/report/;
`generate` stitches the header, the sections (in pipeline order), a plot of the loss curves and
a summary table of the key metrics into report.md.

    from nanochat.report import get_report
    get_report().reset()                                   # start of a run: clear, write the header
    get_report().log(section="Base model training", data=[user_config, {"val_bpb": 0.91, "wall_clock_s": 812.0}])

    python -m nanochat.report reset
    python -m nanochat.report generate                     # ./report.md and <base>/report/report.md

Layout of <base>/report/: header.md (from reset), one <slug>.md per section (first line
"## <section>"), report.md and loss_curves.png (from generate). A section's data is a list of
dicts (written as "- key: value" lines) and strings (written as paragraphs). The summary table
reads the "- key: value" lines back: keys are matched after lowercasing and dropping everything
but letters and digits, so "val_bpb", "val bpb" and "Val BPB" are the same metric. Logged
"wall_clock_s" values are summed into the total wall-clock time. Only rank 0 writes anything.
"""

import os
import contextlib
import re
import glob
import json
import datetime
import argparse
import platform
import subprocess

from nanochat.common import UserError, cli_main, get_base_dir, atomic_path, get_dist_info

# the pipeline's sections, in report order; any other section comes after these, by name
SECTION_ORDER = [
    "Tokenizer training",
    "Tokenizer evaluation",
    "Base model training",
    "Base model evaluation",
    "Recall testbed training",
    "Chat SFT",
    "Chat RL",
    "Chat evaluation sft",
    "Chat evaluation rl",
    "Base model evaluation sft",
    "Base model evaluation rl",
]
# which column of the summary table a section's metrics land in; a later section overrides an
# earlier one within a stage (the evaluation's val bpb wins over the training's)
SECTION_STAGE = {
    "Base model training": "BASE",
    "Base model evaluation": "BASE",
    "Base model evaluation sft": "SFT",  # base_eval --source sft / rl
    "Base model evaluation rl": "RL",
    "Chat SFT": "SFT",
    "Chat evaluation sft": "SFT",
    "Chat RL": "RL",
    "Chat evaluation rl": "RL",
}
STAGES = ["BASE", "SFT", "RL"]
# summary rows: (label, accepted keys in normalized form)
SUMMARY_METRICS = [
    ("val bpb", ("valbpb",)),
    ("CORE", ("core", "coremetric")),
    ("ARC-Easy", ("arceasy",)),
    ("ARC-Challenge", ("arcchallenge",)),
    ("MMLU", ("mmlu",)),
    ("GSM8K", ("gsm8k",)),
    ("HumanEval", ("humaneval",)),
    ("ChatCORE", ("chatcore",)),
    ("ChatCORE-5", ("chatcore5",)),  # chat_eval's default tasks: upstream's ChatCORE less SpellingBee
    ("Arithmetic", ("arithmetic",)),
    ("Spelling", ("spelling",)),
]
WALL_CLOCK_KEY = "wallclocks"  # normalized "wall_clock_s"
RESERVED = ("header", "report")  # file names the report itself uses
CURVE_DIRS = [("base", "base_checkpoints"), ("sft", "chatsft_checkpoints")]


def slugify(section):
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")


def normalize_key(key):
    return re.sub(r"[^a-z0-9]", "", str(key).lower())


def format_value(v):
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.6g}"  # short, and float() reads it back for the summary
    return str(v)


def now():
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


# -----------------------------------------------------------------------------
# Header: when, which code, which machine

def git_commit():
    """Short commit of the repo this file lives in, '+dirty' if it has changes; None outside git."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        run = lambda *args: subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=5)
        head = run("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def ram_gib():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):  # not a POSIX system that knows these
        return None


def header_markdown():
    import torch
    ram = ram_gib()
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        gpu = ", ".join(f"{names.count(n)}x {n}" for n in dict.fromkeys(names))
    else:
        gpu = "none"
    lines = [
        "# nanochat training report",
        "",
        f"Run started: {now()}",
        "",
        "## Environment",
        "",
        f"- git commit: {git_commit() or 'unknown'}",
        f"- platform: {platform.platform()}",
        f"- CPUs: {os.cpu_count()}",
        f"- RAM: {f'{ram:.1f} GiB' if ram is not None else 'unknown'}",
        f"- GPU: {gpu}",
        f"- Python: {platform.python_version()}",
        f"- PyTorch: {torch.__version__}",
    ]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Loss curves from the training scripts' train_log.jsonl files

def read_jsonl(path):
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:  # torn bytes too: that line then fails to parse
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a crash can leave a torn last line
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
                records.append(record)
    return records


def collect_curves(base_dir):
    """[(run label, [(step, train loss)], [(step, val value)], val key)] for every log found."""
    curves = []
    for stage, dirname in CURVE_DIRS:
        for path in sorted(glob.glob(os.path.join(base_dir, dirname, "*", "train_log.jsonl"))):
            records = read_jsonl(path)
            label = f"{stage}/{os.path.basename(os.path.dirname(path))}"
            train = [(r["step"], r.get("smooth_loss", r.get("loss"))) for r in records if r.get("kind") == "train"]
            train = [(s, v) for s, v in train if isinstance(v, (int, float))]
            val_key = "val_bpb" if any("val_bpb" in r for r in records) else "val_loss"  # SFT logs val_loss
            val = [(r["step"], r[val_key]) for r in records if r.get("kind") == "eval" and isinstance(r.get(val_key), (int, float))]
            if train or val:
                curves.append((label, train, val, val_key))
    return curves


def plot_curves(curves, path):
    """Two panels side by side, train loss and validation, one line per run; PNG via Agg."""
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)  # no pyplot, no GUI backend, no global state
    ax_train, ax_val = fig.subplots(1, 2)
    for label, train, val, val_key in curves:
        if train:
            ax_train.plot(*zip(*train), label=label)
        if val:
            ax_val.plot(*zip(*val), marker="o", markersize=3, label=f"{label} ({val_key})")
    ax_train.set(title="train loss (smoothed)", xlabel="step", ylabel="loss")
    ax_val.set(title="validation", xlabel="step", ylabel="bpb / loss")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def collect_recall_curves(base_dir):
    """[(run label, method, [(tokens seen, exact recall)])] from the recall/* values that base_train
    --recall-facts logs at each eval (full, truncation, megacontext)."""
    curves = []
    for path in sorted(glob.glob(os.path.join(base_dir, "base_checkpoints", "*", "train_log.jsonl"))):
        records = [r for r in read_jsonl(path) if r.get("kind") == "eval"]
        label = os.path.basename(os.path.dirname(path))
        for method in ("megacontext", "truncation", "full"):
            points = [(r.get("tokens_seen", r["step"]), r[f"recall/{method}"]) for r in records
                      if isinstance(r.get(f"recall/{method}"), (int, float))]
            if points:
                curves.append((label, method, points))
    return curves


def plot_recall_curves(curves, path):
    """Exact recall against training tokens, one line per run and method; PNG via Agg."""
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    styles = {"megacontext": "-", "truncation": ":", "full": "--"}
    for label, method, points in curves:
        ax.plot(*zip(*points), styles[method], marker="o", markersize=3, label=f"{label}: {method}")
    ax.set(title="exact recall of a fact ~a row back", xlabel="training tokens", ylabel="recall", ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


# -----------------------------------------------------------------------------
# Summary table

def parse_metrics(markdown):
    """{normalized key: float} from the "- key: value" lines of a section."""
    metrics = {}
    for line in markdown.splitlines():
        m = re.match(r"^- (.+?): (.+)$", line)
        if m:
            try:
                metrics[normalize_key(m.group(1))] = float(m.group(2))
            except ValueError:
                pass
    return metrics


def format_duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def summary_markdown(sections):
    """sections: [(title, markdown)] in report order."""
    table = {}  # (label, stage) -> value
    wall_clock = []
    tags = {}  # stage -> {section title: the model_tag it names}
    for title, markdown in sections:
        metrics = parse_metrics(markdown)
        if WALL_CLOCK_KEY in metrics:
            wall_clock.append(metrics[WALL_CLOCK_KEY])
        subset = title not in SECTION_STAGE  # e.g. "Chat evaluation sft: Arithmetic, Spelling (30 problems each)"
        stage = SECTION_STAGE.get(title.split(": ")[0])
        if stage is None:
            continue
        tag = re.search(r"^- model_tag: (.+)$", markdown, re.MULTILINE)
        if tag:
            tags.setdefault(stage, {})[title] = tag.group(1).strip()
        for label, keys in SUMMARY_METRICS:
            for key in keys:
                if key in metrics and not (subset and (label, stage) in table):  # a subset run fills gaps only
                    table[(label, stage)] = metrics[key]
    lines = ["## Summary", ""]
    rows = [label for label, _ in SUMMARY_METRICS if any((label, s) in table for s in STAGES)]
    if rows:
        lines += ["| Metric | " + " | ".join(STAGES) + " |", "|" + "---|" * (len(STAGES) + 1)]
        for label in rows:
            cells = [f"{table[(label, s)]:.4f}" if (label, s) in table else "-" for s in STAGES]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    else:
        lines.append("No summary metrics were logged.")
    for stage in STAGES:  # a later run of one stage on another model must not pass for the same model's figures
        named = tags.get(stage, {})
        if len(set(named.values())) > 1:
            lines += ["", f"Warning: the {stage} column mixes models: " + ", ".join(f"{t} ({title})" for title, t in named.items())]
    if wall_clock:
        lines += ["", f"Total wall clock time: {format_duration(sum(wall_clock))}"]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------

class Report:
    def __init__(self, report_dir):
        self.report_dir = report_dir

    @staticmethod
    def is_master():
        return get_dist_info()[1] == 0

    def write(self, name, text):
        with atomic_path(os.path.join(self.report_dir, name)) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)

    def log(self, section, data):
        """Write (or overwrite) one section. data: list of dicts and strings. Returns the file path."""
        slug = slugify(section)
        if not slug or slug in RESERVED:
            raise UserError(f"bad report section name {section!r}")
        if not self.is_master():
            return None
        lines = [f"## {section}", f"timestamp: {now()}", ""]
        for item in data:
            if isinstance(item, dict):
                lines += [f"- {k}: {format_value(v)}" for k, v in item.items()]
            else:
                lines.append(str(item))
            lines.append("")
        self.write(slug + ".md", "\n".join(lines))
        return os.path.join(self.report_dir, slug + ".md")

    def reset(self):
        """Remove the old sections, report and plot; write a fresh header."""
        if not self.is_master():
            return
        for path in glob.glob(os.path.join(self.report_dir, "*.md")) + [os.path.join(self.report_dir, f) for f in ("loss_curves.png", "recall_curves.png")]:
            if os.path.isfile(path):
                os.remove(path)
        self.write("header.md", header_markdown())

    def sections(self):
        """[(title, markdown)]: the pipeline's sections in order, then the others by title."""
        found = []
        for path in glob.glob(os.path.join(self.report_dir, "*.md")):
            if os.path.basename(path)[:-3] in RESERVED or not os.path.isfile(path):
                continue
            with open(path, encoding="utf-8", errors="replace") as f:  # a stray byte shows as U+FFFD, not a traceback
                markdown = f.read()
            first = markdown.split("\n", 1)[0]
            title = first[3:].strip() if first.startswith("## ") else os.path.basename(path)[:-3]
            found.append((title, markdown))
        order = {slugify(s): i for i, s in enumerate(SECTION_ORDER)}
        return sorted(found, key=lambda s: (order.get(slugify(s[0]), len(order)), s[0]))

    def generate(self, out_path=None):
        """Write <report_dir>/report.md and a copy at out_path (default ./report.md). Returns the former."""
        if not self.is_master():
            return None
        sections = self.sections()
        curves = collect_curves(os.path.dirname(self.report_dir))
        if not sections and not curves:
            raise UserError(f"nothing to report: no sections in {self.report_dir} and no train_log.jsonl "
                            "under base_checkpoints/ or chatsft_checkpoints/ (run a pipeline stage first)")
        header_path = os.path.join(self.report_dir, "header.md")
        if os.path.exists(header_path):
            with open(header_path, encoding="utf-8", errors="replace") as f:
                header = f.read()
        else:  # no reset was run: describe this machine, now
            header = header_markdown()
        png = os.path.join(self.report_dir, "loss_curves.png")
        recall_png = os.path.join(self.report_dir, "recall_curves.png")
        recall = collect_recall_curves(os.path.dirname(self.report_dir))
        for plot, data, path in ((plot_curves, curves, png), (plot_recall_curves, recall, recall_png)):
            if data:
                plot(data, path)
            elif os.path.exists(path):
                os.remove(path)  # stale plot of an earlier run
        out_path = os.path.abspath(out_path or "report.md")
        main_path = os.path.join(self.report_dir, "report.md")
        for path in dict.fromkeys([main_path, out_path]):
            parts = [header.rstrip("\n") + f"\n\nReport generated: {now()}\n"]
            parts += [markdown.rstrip("\n") + "\n" for _, markdown in sections]
            if curves:
                rel = os.path.relpath(png, os.path.dirname(path)).replace(os.sep, "/")
                parts.append(f"## Loss curves\n\n![loss curves]({rel})\n")
            if recall:
                rel = os.path.relpath(recall_png, os.path.dirname(path)).replace(os.sep, "/")
                parts.append(f"## Recall curves\n\n![recall curves]({rel})\n")
            parts.append(summary_markdown(sections))
            # a pipe, a terminal, /dev/stdout: written through; a link to a file: the file replaced, the link kept
            streamed = os.path.exists(path) and not os.path.isfile(path)
            with contextlib.nullcontext(path) if streamed else atomic_path(os.path.realpath(path)) as target:
                with open(target, "w", encoding="utf-8") as f:
                    f.write("\n".join(parts))
        return main_path


def get_report():
    return Report(os.path.join(get_base_dir(), "report"))


def main():
    p = argparse.ArgumentParser(description="nanochat report card", allow_abbrev=False)
    p.add_argument("command", choices=["generate", "reset"])
    p.add_argument("-o", "--output", type=str, default="report.md", help="generate: where to write the copy of report.md")
    args = p.parse_args()
    if args.command == "generate":
        if os.path.isdir(args.output):
            p.error(f"-o {args.output} is a directory: give the report's file name (e.g. {os.path.join(args.output, 'report.md')})")
        near = os.path.dirname(os.path.abspath(args.output))
        while not os.path.exists(near):  # the folders generate would create: the nearest one that exists must take them
            near = os.path.dirname(near)
        if not os.path.isdir(near) or not os.access(near, os.W_OK):
            p.error(f"-o {args.output}: {near} is {'not a directory' if not os.path.isdir(near) else 'not writable'}")
    report = get_report()
    if args.command == "reset":
        report.reset()
        print(f"report reset: {report.report_dir}")
    else:
        path = report.generate(args.output)
        print(f"report written: {path} and {os.path.abspath(args.output)}")


if __name__ == "__main__":
    cli_main(main)
