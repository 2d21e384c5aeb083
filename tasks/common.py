"""
What every task shares: the Task base class, TaskMixture / TaskSequence, loading rows of a
Hugging Face dataset (or of local parquet / jsonl files), multiple-choice rendering and the
"#### <number>" final-answer convention.

A conversation is a dict {"messages": [{"role": "user"|"assistant"|"system", "content": ...}]}
(assistant content: a string or a list of parts {"type": "text"|"python"|"python_output",
"text": str}), plus optional task-specific keys (e.g. "letters" for multiple choice).
"""

import os
import re
import json
import random
import hashlib

from nanochat.common import UserError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Task:
    """
    A list-like set of conversations. Subclasses implement num_examples() and get_example(i);
    the base class adds an optional view [start:stop:step] over those examples, so that e.g.
    MMLU(subset="all", split="test", stop=500) is the first 500 test questions.
    eval_type: "categorical" (score by comparing the letter of the choice) or "generative"
    (sample a whole answer and check it).
    """
    eval_type = None

    def __init__(self, start=0, stop=None, step=1):
        assert start >= 0 and step >= 1 and (stop is None or stop >= start), f"bad view [{start}:{stop}:{step}]"
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self):
        raise NotImplementedError

    def get_example(self, index):
        raise NotImplementedError

    def evaluate(self, conversation, assistant_response):
        raise NotImplementedError

    def __len__(self):
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, (stop - self.start + self.step - 1) // self.step)

    def __getitem__(self, index):
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{type(self).__name__} index {index} out of range ({n} items)")
        return self.get_example(self.start + index * self.step)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class TaskMixture:
    """
    The union of several tasks, in one fixed shuffled order (same seed -> same order), so a
    training run sees a blend of all of them. Listing a task twice counts it twice
    (a simple way to oversample a small task).
    """

    def __init__(self, tasks, seed=42):
        self.tasks = list(tasks)
        self.index = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]  # (task id, item id)
        random.Random(seed).shuffle(self.index)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, index):
        t, i = self.index[index]
        return self.tasks[t][i]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class TaskSequence:
    """Tasks one after the other, unshuffled (a curriculum: all of the first, then the next ...)."""

    def __init__(self, tasks):
        self.tasks = list(tasks)
        self.offsets = [0]  # offsets[t] = global index of task t's first item
        for task in self.tasks:
            self.offsets.append(self.offsets[-1] + len(task))

    def __len__(self):
        return self.offsets[-1]

    def __getitem__(self, index):
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"TaskSequence index {index} out of range ({len(self)} items)")
        t = next(t for t in range(len(self.tasks)) if index < self.offsets[t + 1])
        return self.tasks[t][index - self.offsets[t]]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


# -----------------------------------------------------------------------------
# Loading rows

class _TableRows:
    """Rows of a pyarrow table as dicts, converted one at a time (a big table stays columnar)."""

    def __init__(self, table):
        self.table = table

    def __len__(self):
        return self.table.num_rows

    def __getitem__(self, i):
        return self.table.slice(i, 1).to_pylist()[0]


def _read_local(path):
    """One local file -> pyarrow table. .parquet, or .jsonl / .json (one JSON object per line,
    or a single JSON list of objects)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    if not path.endswith((".parquet", ".jsonl", ".json")):
        raise UserError(f"data file must be .parquet, .jsonl or .json: {path}")
    if not os.path.exists(path):
        raise UserError(f"no such data file: {path}")
    if path.endswith(".parquet"):
        return pq.read_table(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
    return pa.Table.from_pylist(rows)


def load_rows(path, config, split, data_files=None):
    """
    Rows of a dataset as a sequence of dicts (len() and [i]).
    data_files=None: `datasets.load_dataset(path, config, split=split)` (the Hub, or its cache;
    honours HF_DATASETS_OFFLINE). data_files = a file or a list of files (.parquet / .jsonl /
    .json) with the same columns as the Hub dataset: read directly, nothing is downloaded or
    cached, and split/config are ignored (the files are that split).
    """
    if data_files is None:
        import datasets
        try:
            return datasets.load_dataset(path, config, split=split)
        except Exception as e:  # offline, unknown name, corrupt cache: one line, not a traceback
            raise UserError(f"could not load dataset {path}/{config or ''} split {split!r}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                            f"(no network? pass local files with data_files=...)") from e
    import pyarrow as pa
    files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    if not files:
        raise UserError("data_files is empty")
    tables = [_read_local(os.fspath(f)) for f in files]
    return _TableRows(pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0])


class _Shuffled:
    """rows in a fixed permutation, the one `datasets.Dataset.shuffle(seed=seed)` applies
    (numpy's default_rng(seed).permutation), so a task's example i is upstream's example i and
    a prefix (chat_eval -x N) is upstream's subset."""

    def __init__(self, rows, seed):
        import numpy as np
        self.rows, self.order = rows, np.random.default_rng(seed).permutation(len(rows)).tolist()

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[self.order[i]]


def shuffled(rows, seed):
    """rows (len() and [i]) in upstream's shuffled order for seed; seed None: as stored."""
    return rows if seed is None else _Shuffled(rows, seed)


# -----------------------------------------------------------------------------
# Multiple choice

def render_mc(question, letters, choices):
    """
    The user message of a multiple-choice question: the question, then one line per choice
    "A. text", then the instruction. The letter comes first on each line and again in the
    instruction so that a small model can copy it.
    """
    assert len(letters) == len(choices) and len(choices) >= 2, "need one letter per choice, at least two"
    lines = [question.strip(), ""]
    lines += [f"{letter}. {str(choice).strip()}" for letter, choice in zip(letters, choices)]
    lines += ["", f"Answer with the letter of the correct choice ({', '.join(letters)})."]
    return "\n".join(lines)


def mc_conversation(question, choices, gold_index, **extra):
    """A multiple-choice conversation: user = render_mc(...), assistant = the gold letter."""
    letters = tuple(LETTERS[:len(choices)])
    messages = [
        {"role": "user", "content": render_mc(question, letters, choices)},
        {"role": "assistant", "content": letters[gold_index]},
    ]
    return {"messages": messages, "letters": letters, **extra}


def evaluate_mc(conversation, assistant_response):
    """True iff the response (stripped, e.g. " B" or "B.") is the gold letter."""
    gold = conversation["messages"][-1]["content"]
    response = assistant_response.strip().rstrip(".)").strip()
    return response == gold


# -----------------------------------------------------------------------------
# "#### <number>" answers (GSM8K style)

ANSWER_RE = re.compile(r"#### (-?[0-9.,]+)")


def extract_answer(text):
    """The number after the first '#### ' in text, commas removed, or None: the rule of GSM8K's
    official code and of upstream nanochat (GSM8K, SpellingBee), so scores compare with theirs."""
    match = ANSWER_RE.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def answers_equal(a, b):
    """Exact string match of two extracted answers, as upstream compares them ("72.0" is not
    "72"); None never equals anything."""
    return a is not None and b is not None and a == b


def gold_answer(conversation):
    """The #### number of the conversation's last assistant message."""
    content = conversation["messages"][-1]["content"]
    text = content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")
    return extract_answer(text)


def evaluate_final_number(conversation, assistant_response):
    return answers_equal(extract_answer(assistant_response), gold_answer(conversation))


# -----------------------------------------------------------------------------
# Deterministic generation (offline tasks)

def stable_hash(*parts):
    """A hash of the parts that is the same in every process and Python version (unlike hash())."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


def in_split(key, split, test_every=10):
    """Which split a generated item belongs to, decided by its content: 1 in test_every keys are
    "test", the rest "train", so the two splits can never share an item."""
    assert split in ("train", "test"), f"split must be 'train' or 'test', got {split!r}"
    is_test = stable_hash("split", key) % test_every == 0
    return is_test == (split == "test")
