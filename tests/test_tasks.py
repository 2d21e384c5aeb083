"""
Tasks: offline generators (arithmetic, spelling, identity), the mixtures, and the five Hub
loaders fed with tiny local files written here (never the network).
"""

import os
import sys
import json
import types
import subprocess

os.environ["HF_DATASETS_OFFLINE"] = "1"  # belt and braces: nothing here may reach the Hub

import pytest
import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import UserError

from tasks.common import (Task, TaskMixture, TaskSequence, render_mc, extract_answer, answers_equal,
                          load_rows, in_split)
from tasks.smoltalk import SmolTalk
from tasks.mmlu import MMLU
from tasks.arc import ARC
from tasks.gsm8k import GSM8K, parse_calculator_annotations
from tasks.humaneval import HumanEval, build_program, extract_program, extract_program_upstream, leading_imports
from tasks.arithmetic import Arithmetic
from tasks.spelling import Spelling, WORDS, split_words
from tasks.identity import Identity, CONVERSATIONS


def safe_eval(expr):
    return eval(compile(expr, "<expr>", "eval"), {"__builtins__": {}}, {})


def conversation_text(conversation):
    out = []
    for m in conversation["messages"]:
        c = m["content"]
        out.append(c if isinstance(c, str) else "".join(p["text"] for p in c))
    return "\n".join(out)


@pytest.fixture(scope="module")
def tokenizer():
    from nanochat.tokenizer import RustBPETokenizer
    texts = [conversation_text(Identity()[i]) for i in range(len(Identity()))]
    texts += [conversation_text(Arithmetic("train", size=50)[i]) for i in range(50)]
    return RustBPETokenizer.train_from_iterator(iter(texts), 400)


def assert_renders(tokenizer, conversation):
    ids, mask = tokenizer.render_conversation(conversation, max_tokens=100000)
    assert len(ids) == len(mask) > 2
    assert ids[0] == tokenizer.get_bos_token_id()
    assert sum(mask) > 0  # something for the assistant to learn
    assert ids[-1] == tokenizer.encode_special("<|assistant_end|>")
    return ids, mask


# -----------------------------------------------------------------------------
# tiny local copies of the Hub datasets (same columns)

def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


MMLU_ROWS = [
    {"question": "What is 2 + 2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "22"], "answer": 1},
    {"question": "Which gas do plants absorb?", "subject": "biology", "choices": ["Oxygen", "Nitrogen", "Carbon dioxide", "Helium"], "answer": 2},
    {"question": "Capital of France?", "subject": "geography", "choices": ["Paris", "Rome", "Berlin", "Madrid"], "answer": 0},
]
ARC_ROWS = [
    {"id": "q1", "question": "What melts ice fastest?", "choices": {"text": ["salt", "sand", "paper", "wood"], "label": ["A", "B", "C", "D"]}, "answerKey": "A"},
    {"id": "q2", "question": "Which is a mammal?", "choices": {"text": ["shark", "whale", "trout"], "label": ["1", "2", "3"]}, "answerKey": "2"},
]
GSM8K_ROWS = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
]
HUMANEVAL_ROWS = [
    {"task_id": "HumanEval/0", "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n",
     "canonical_solution": "    return a + b\n",
     "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n",
     "entry_point": "add"},
]
SMOLTALK_ROWS = [
    {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}]},
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."},
                  {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
                  {"role": "assistant", "content": "Red."}]},
]


def test_mmlu_local_parquet_and_categorical_evaluate(tmp_path, tokenizer):
    task = MMLU(subset="all", split="test", data_files=write_parquet(tmp_path / "mmlu.parquet", MMLU_ROWS))
    assert task.eval_type == "categorical" and len(task) == 3
    seen = {}
    for conv in task:
        assert_renders(tokenizer, conv)
        assert conv["letters"] == ("A", "B", "C", "D")
        user = conv["messages"][0]["content"]
        for letter in conv["letters"]:
            assert f"\n{letter}. " in user
        seen[conv["messages"][0]["content"].split("\n")[0]] = conv
    conv = seen["What is 2 + 2?"]
    assert conv["messages"][-1]["content"] == "B" and conv["subject"] == "elementary_mathematics"
    assert task.evaluate(conv, "B") and task.evaluate(conv, " B.")
    assert not task.evaluate(conv, "C") and not task.evaluate(conv, "") and not task.evaluate(conv, "BB")
    # a view: stop/step
    assert len(MMLU(data_files=str(tmp_path / "mmlu.parquet"), stop=2)) == 2
    assert len(MMLU(data_files=str(tmp_path / "mmlu.parquet"), step=2)) == 2


def test_tasks_serve_upstreams_order_the_one_datasets_shuffle_seed_42_gives(tmp_path):
    """Upstream loads ARC, MMLU, GSM8K, HumanEval and SmolTalk with .shuffle(seed=42): example i
    (and so chat_eval -x N's subset) must be the same row here."""
    import datasets
    rows = [dict(GSM8K_ROWS[0], question=f"q{i}") for i in range(37)]
    want = [r["question"] for r in datasets.Dataset.from_list(rows).shuffle(seed=42)]
    assert want != [r["question"] for r in rows]
    task = GSM8K(data_files=write_parquet(tmp_path / "g.parquet", rows))
    assert [c["messages"][0]["content"] for c in task] == want
    for cls, base, key, kw in ((ARC, ARC_ROWS, "question", {}), (MMLU, MMLU_ROWS, "question", {}),
                               (HumanEval, HUMANEVAL_ROWS, "prompt", {}), (SmolTalk, SMOLTALK_ROWS, "messages", dict(split="test"))):
        rows = [dict(base[i % len(base)]) for i in range(23)]
        for i, r in enumerate(rows):
            r[key] = [dict(r[key][0], content=f"m{i}")] + r[key][1:] if key == "messages" else f"{r[key]} #{i}"
        want = datasets.Dataset.from_list(rows).shuffle(seed=42)[key]
        got = [row[key] for row in cls(data_files=write_jsonl(tmp_path / f"{cls.__name__}.jsonl", rows), **kw).rows]
        assert got == want, cls.__name__


def test_mmlu_auxiliary_train_nested_rows(tmp_path):
    rows = [{"train": r} for r in MMLU_ROWS]
    task = MMLU(subset="auxiliary_train", split="train", data_files=write_jsonl(tmp_path / "aux.jsonl", rows), shuffle_seed=None)
    assert task[2]["messages"][-1]["content"] == "A"


def test_arc_local_jsonl_relabels_numeric_labels(tmp_path, tokenizer):
    task = ARC(subset="ARC-Challenge", split="test", data_files=write_jsonl(tmp_path / "arc.jsonl", ARC_ROWS), shuffle_seed=None)
    assert len(task) == 2
    assert task[0]["messages"][-1]["content"] == "A"
    conv = task[1]
    assert conv["letters"] == ("A", "B", "C") and conv["messages"][-1]["content"] == "B"
    assert "B. whale" in conv["messages"][0]["content"]
    assert task.evaluate(conv, "B") and not task.evaluate(conv, "A")
    for c in task:
        assert_renders(tokenizer, c)


def test_gsm8k_calculator_annotation_parsing():
    parts = parse_calculator_annotations(GSM8K_ROWS[0]["answer"])
    assert parts == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"},
    ]
    assert parse_calculator_annotations("no tools here\n#### 5") == [{"type": "text", "text": "no tools here\n#### 5"}]
    assert parse_calculator_annotations("odd <<note>> text") == [{"type": "text", "text": "odd <<note>> text"}]


def test_gsm8k_local_parquet_evaluate_and_reward(tmp_path, tokenizer):
    task = GSM8K(subset="main", split="test", data_files=write_parquet(tmp_path / "gsm8k.parquet", GSM8K_ROWS), shuffle_seed=None)
    assert len(task) == 2 and task.eval_type == "generative"
    conv = task[1]
    assert [p["text"] for p in conv["messages"][1]["content"] if p["type"] == "python"] == ["12/60", "0.2*50"]
    ids, mask = assert_renders(tokenizer, conv)
    out_start = tokenizer.encode_special("<|output_start|>")
    assert mask[ids.index(out_start)] == 0  # tool output is not supervised
    assert task.evaluate(conv, "so she earned $10.\n#### 10")
    assert not task.evaluate(conv, "#### 10.0") and task.evaluate(conv, "#### 10\nno, #### 11")  # as upstream scores them
    assert not task.evaluate(conv, "#### 11") and not task.evaluate(conv, "10")
    assert task.reward(conv, "#### 10") == 1.0 and task.reward(conv, "#### 9") == 0.0


def test_extract_answer():
    assert extract_answer("x\n#### 1,234") == "1234"
    assert extract_answer("#### -3.5") == "-3.5"
    assert extract_answer("#### 1\nno: #### 2") == "1"  # the first, as upstream and GSM8K's own code take it
    assert extract_answer("no answer") is None and extract_answer("####5") is None
    assert answers_equal("72", "72") and not answers_equal("72", "72.0")  # upstream compares the strings
    assert not answers_equal(None, None) and not answers_equal(None, "1") and not answers_equal("7", "8")


def fake_execution(monkeypatch):
    """execution is nanochat.execution's job; stand in for it with a plain subprocess"""
    def execute_code(program, timeout=5.0):
        r = subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=timeout)
        return types.SimpleNamespace(success=r.returncode == 0)
    monkeypatch.setitem(sys.modules, "nanochat.execution", types.SimpleNamespace(execute_code=execute_code))


def test_humaneval_harness_rule_runs_the_prompt_with_the_reply(tmp_path, tokenizer, monkeypatch):
    task = HumanEval(data_files=write_jsonl(tmp_path / "he.jsonl", HUMANEVAL_ROWS), rule="harness")
    conv = task[0]
    assert_renders(tokenizer, conv)
    assert conv["entry_point"] == "add" and conv["messages"][0]["content"].startswith("Complete this Python function")
    # the reference answer, as the model would write it, is a fenced block holding the whole function
    completion = extract_program(conv["messages"][-1]["content"])
    assert completion.startswith("def add(a, b):") and "return a + b" in completion
    program = build_program(conv, completion)
    assert program.rstrip().endswith("check(add)")
    fake_execution(monkeypatch)
    assert task.evaluate(conv, conv["messages"][-1]["content"]) is True
    assert task.evaluate(conv, "    return a + b\n") is True  # a body that continues the prompt
    assert task.evaluate(conv, "```python\ndef add(a, b):\n    return a - b\n```") is False
    assert task.evaluate(conv, "def add(a, b) return") is False  # syntax error


def test_humaneval_default_is_upstreams_rule_imports_and_the_replys_code_only(tmp_path, tokenizer, monkeypatch):
    """Upstream asks with the bare prompt and runs the prompt's imports + the reply's code + tests: a body
    that continues the prompt, or a helper only the prompt defines, fails there (ChatCORE compares only so)."""
    rows = [dict(HUMANEVAL_ROWS[0], prompt="# helpers\nimport math\n\nfrom typing import List\n"
                 "def half(x):\n    return x / 2\n\ndef add(a, b):\n    \"\"\"Return a + b.\"\"\"\n")]
    task = HumanEval(data_files=write_jsonl(tmp_path / "he.jsonl", rows))
    conv = task[0]
    assert_renders(tokenizer, conv)
    assert conv["messages"][0]["content"] == rows[0]["prompt"]
    assert conv["messages"][1]["content"] == rows[0]["prompt"] + "\n" + rows[0]["canonical_solution"]
    assert leading_imports(rows[0]["prompt"]) == "import math\nfrom typing import List"
    assert extract_program_upstream("Sure:\n```python\n  x = 1\n```\n```\ny\n```") == "x = 1"
    assert extract_program_upstream("```python\nno closing fence") == "```python\nno closing fence"
    fake_execution(monkeypatch)
    good = "Here it is:\n```python\ndef add(a: List[int], b):\n    return math.floor(a + b)\n```\nDone."
    assert task.evaluate(conv, good) is True  # the prompt's imports are run
    assert task.evaluate(conv, conv["messages"][1]["content"]) is True  # the reference, unfenced
    assert task.evaluate(conv, "    return a + b\n") is False  # a body alone: stripped, "return" outside a function
    assert task.evaluate(conv, "```python\ndef add(a, b):\n    return int(half(2 * a + 2 * b))\n```") is False  # half() is the prompt's
    assert HumanEval(data_files=tmp_path / "he.jsonl", rule="harness").evaluate(
        conv, "```python\ndef add(a, b):\n    return int(half(2 * a + 2 * b))\n```") is True
    assert task.evaluate(conv, "```python\ndef add(a, b):\n    return a + b\n") is False  # cut before its closing fence


def test_smoltalk_local_parquet(tmp_path, tokenizer):
    task = SmolTalk(split="test", data_files=write_parquet(tmp_path / "smol.parquet", SMOLTALK_ROWS), shuffle_seed=None)
    assert len(task) == 2
    assert task[1]["messages"][0]["role"] == "system"
    for conv in task:
        assert_renders(tokenizer, conv)
    bad = SmolTalk(data_files=write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}]))
    with pytest.raises(ValueError, match="alternate"):
        bad[0]


def test_load_rows_hub_path_calls_datasets(monkeypatch):
    import datasets
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or ["row"])
    assert load_rows("cais/mmlu", "all", "test") == ["row"]
    ARC(subset="ARC-Easy", split="validation")
    GSM8K(subset="main", split="train")
    HumanEval()
    SmolTalk(split="train")
    assert calls == [(("cais/mmlu", "all"), {"split": "test"}),
                     (("allenai/ai2_arc", "ARC-Easy"), {"split": "validation"}),
                     (("openai/gsm8k", "main"), {"split": "train"}),
                     (("openai/openai_humaneval", "openai_humaneval"), {"split": "test"}),
                     (("HuggingFaceTB/smol-smoltalk", "default"), {"split": "train"})]


def test_load_rows_concatenates_files_and_rejects_unknown(tmp_path):
    a = write_parquet(tmp_path / "a.parquet", MMLU_ROWS[:2])
    b = write_jsonl(tmp_path / "b.jsonl", MMLU_ROWS[2:])
    rows = load_rows("cais/mmlu", "all", "test", data_files=[a, b])
    assert len(rows) == 3 and rows[2]["question"] == "Capital of France?"
    (tmp_path / "a.csv").write_text("question\nq\n")
    with pytest.raises(UserError, match="parquet, .jsonl or .json"):
        load_rows("x", None, "test", data_files=str(tmp_path / "a.csv"))
    with pytest.raises(UserError, match="no such data file"):
        load_rows("x", None, "test", data_files=str(tmp_path / "missing.parquet"))
    with pytest.raises(UserError, match="empty"):
        load_rows("x", None, "test", data_files=[])


# -----------------------------------------------------------------------------
# offline tasks

def test_arithmetic_items_are_correct_and_render(tokenizer):
    task = Arithmetic("train", size=200)
    for conv in task:
        parts = conv["messages"][1]["content"]
        calls = [(p["text"], q["text"]) for p, q in zip(parts, parts[1:]) if p["type"] == "python"]
        assert calls and all(q["type"] == "python_output" for p, q in zip(parts, parts[1:]) if p["type"] == "python")
        for expr, output in calls:
            assert safe_eval(expr) == int(output)
        final = extract_answer(parts[-1]["text"])
        assert final == calls[-1][1] == str(conv["answer"])
        assert task.evaluate(conv, f"... #### {final}") and task.reward(conv, f"#### {final}") == 1.0
        assert not task.evaluate(conv, f"#### {int(final) + 1}") and task.reward(conv, "nope") == 0.0
    for i in range(20):
        assert_renders(tokenizer, task[i])


def test_arithmetic_matches_the_engine_calculator():
    engine = pytest.importorskip("nanochat.engine")
    calculator = getattr(engine, "calculator", None)
    if calculator is None:
        pytest.skip("nanochat.engine has no calculator()")
    for conv in Arithmetic("test", size=100):
        parts = conv["messages"][1]["content"]
        for p, q in zip(parts, parts[1:]):
            if p["type"] == "python":
                assert str(calculator(p["text"])) == q["text"]
    for conv in Spelling("test", size=50):
        if conv["kind"] == "count":
            p, q = conv["messages"][1]["content"][1:3]
            assert str(calculator(p["text"])) == q["text"]


def test_offline_tasks_deterministic_and_splits_disjoint():
    a, b = Arithmetic("train", size=500), Arithmetic("train", size=500)
    assert [a[i] for i in (0, 7, 499)] == [b[i] for i in (0, 7, 499)]
    assert a[3] != a[4]
    assert Arithmetic("train", seed=1)[0] != a[0]
    train_q = {c["messages"][0]["content"] for c in a}
    test_q = {c["messages"][0]["content"] for c in Arithmetic("test", size=200)}
    assert len(train_q) > 450 and len(test_q) > 180 and not train_q & test_q
    s_train, s_test = Spelling("train", size=300), Spelling("test", size=300)
    assert s_train[11] == Spelling("train", size=300)[11]
    assert not {c["word"] for c in s_train} & {c["word"] for c in s_test}
    assert set(split_words("train")) | set(split_words("test")) == set(WORDS)
    assert in_split("x", "train") != in_split("x", "test")


def test_a_spelling_is_scored_whole_not_inside_a_longer_one():
    """A substring test passed p-i-n-e-a-p-p-l-e and a-p-p-l-e-s for apple."""
    from tasks.spelling import spell_conversation, SPELL_TEMPLATES
    conv = spell_conversation("apple", SPELL_TEMPLATES[0])
    task = Spelling("test", size=1)
    assert task.evaluate(conv, conv["messages"][-1]["content"])  # its own answer
    for right in ("a-p-p-l-e", "It is A-P-P-L-E.", "apple: a-p-p-l-e (5 letters)"):
        assert task.evaluate(conv, right), right
    for wrong in ("p-i-n-e-a-p-p-l-e", "a-p-p-l-e-s", "a-p-p-l-es", "a-p-p-l", "apple"):
        assert not task.evaluate(conv, wrong), wrong


def test_a_humaneval_reply_cut_before_its_closing_fence_still_runs_its_code():
    """The whole reply, its ```python line included, was run: a SyntaxError for a correct function."""
    code = "def add(a, b):\n    return a + b\n"
    assert extract_program("```python\n" + code) == code
    assert extract_program("Here:\n```python\n" + code + "``") == code  # cut inside the closing fence
    assert extract_program("```python\n" + code + "```\nmore text") == code
    for tag in ("python3", "Python", "py3", "", "python  "):  # any info string: "```python3" read the prose after the block
        assert extract_program(f"```{tag}\n" + code + "```\nThis adds the numbers.") == code, tag


def test_spelling_counts_correct(tokenizer):
    task = Spelling("train", size=300)
    kinds = {"count": 0, "spell": 0}
    for conv in task:
        kinds[conv["kind"]] += 1
        word = conv["word"]
        content = conv["messages"][1]["content"]
        if conv["kind"] == "count":
            letter = conv["letter"]
            assert conv["answer"] == word.count(letter)
            assert letter in conv["messages"][0]["content"] and word in conv["messages"][0]["content"]
            expr, output = content[1]["text"], content[2]["text"]
            assert safe_eval(expr) == int(output) == word.count(letter)
            assert extract_answer(content[-1]["text"]) == output
            assert "-".join(word) in content[0]["text"]
            assert task.evaluate(conv, f"#### {output}") and not task.evaluate(conv, f"#### {int(output) + 1}")
        else:
            assert "-".join(word) in content
            assert task.evaluate(conv, content) and not task.evaluate(conv, "-".join(reversed(word + "q")))
    assert kinds["count"] > 150 and kinds["spell"] > 20
    assert any(c["kind"] == "count" and c["answer"] == 0 for c in task)  # asks about absent letters too
    assert any(c["kind"] == "count" and c["answer"] >= 2 for c in task)
    for i in range(30):
        assert_renders(tokenizer, task[i])


def test_strawberry():
    from tasks.spelling import count_conversation, COUNT_TEMPLATES
    conv = count_conversation("strawberry", "r", COUNT_TEMPLATES[0])
    assert conv["messages"][0]["content"] == "How many r are in strawberry?"
    assert conv["answer"] == 3 and "3, 8, 9" in conv["messages"][1]["content"][0]["text"]


def test_identity_set_nontrivial(tokenizer):
    task = Identity()
    assert len(task) >= 30 and len(task) == len(CONVERSATIONS)
    users = [c["messages"][0]["content"] for c in task]
    answers = [c["messages"][1]["content"] for c in task]
    assert len(set(answers)) == len(answers)  # no copy-paste answers
    assert sum("nanochat" in a for a in answers) >= 15
    assert sum("MegaContext" in conversation_text(c) for c in task) >= 5
    assert any(len(c["messages"]) > 2 for c in task)  # some multi-turn
    assert any("who made" in u.lower() for u in users) and any("what can you do" in u.lower() for u in users)
    for conv in task:
        assert len(conv["messages"]) % 2 == 0
        assert_renders(tokenizer, conv)


# -----------------------------------------------------------------------------
# mixtures

class Numbers(Task):
    """A toy task: item i is a one-turn conversation naming (tag, i)."""
    def __init__(self, tag, n, **kwargs):
        super().__init__(**kwargs)
        self.tag, self.n = tag, n

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": f"{self.tag} {index}"}, {"role": "assistant", "content": "ok"}]}


def test_task_view_and_indexing():
    t = Numbers("a", 10, start=2, stop=9, step=3)  # 2, 5, 8
    assert len(t) == 3 and [c["messages"][0]["content"] for c in t] == ["a 2", "a 5", "a 8"]
    assert t[-1]["messages"][0]["content"] == "a 8"
    with pytest.raises(IndexError):
        t[3]
    assert len(Numbers("a", 5, stop=100)) == 5


def test_task_mixture_deterministic_shuffle_and_length():
    tasks = [Numbers("a", 30), Numbers("b", 5), Numbers("a", 30)]  # a listed twice: oversampled
    mix = TaskMixture(tasks)
    assert len(mix) == 65
    keys = [c["messages"][0]["content"] for c in mix]
    assert keys == [c["messages"][0]["content"] for c in TaskMixture(tasks)]  # same seed, same order
    assert keys != [c["messages"][0]["content"] for c in TaskMixture(tasks, seed=7)]
    assert keys[:35] != [f"a {i}" for i in range(30)] + [f"b {i}" for i in range(5)]  # shuffled
    assert sorted(keys) == sorted([f"a {i}" for i in range(30)] * 2 + [f"b {i}" for i in range(5)])
    first_b = min(i for i, k in enumerate(keys) if k.startswith("b"))
    assert first_b < 40  # the small task is spread through, not bunched at the end


def test_task_sequence():
    seq = TaskSequence([Numbers("a", 3), Numbers("b", 2)])
    assert len(seq) == 5
    assert [c["messages"][0]["content"] for c in seq] == ["a 0", "a 1", "a 2", "b 0", "b 1"]
    assert seq[-1]["messages"][0]["content"] == "b 1"
    with pytest.raises(IndexError):
        seq[5]


def test_render_mc():
    text = render_mc("Pick one.", ("A", "B"), ["yes", "no"])
    assert text == "Pick one.\n\nA. yes\nB. no\n\nAnswer with the letter of the correct choice (A, B)."
