"""
GSM8K (openai/gsm8k): grade-school math word problems. Subsets "main" and "socratic", splits
train (7.5K) and test (1.3K). Rows: question, answer. The answer is worked text with calculator
annotations and a final line "#### <number>":

    Natalia sold 48/2 = <<48/2=24>>24 clips in May.
    ...
    #### 72

Each annotation <<expr=result>> becomes a tool call: a "python" part holding expr and a
"python_output" part holding result, so the model learns to call the calculator (the engine
computes the output at inference). The surrounding text is kept as "text" parts.
"""

import re

from tasks.common import Task, load_rows, shuffled, evaluate_final_number

ANNOTATION_RE = re.compile(r"<<([^<>]*)>>")


def parse_calculator_annotations(answer):
    """GSM8K answer text -> list of assistant parts (text / python / python_output)."""
    parts = []

    def add_text(text):
        if not text:
            return
        if parts and parts[-1]["type"] == "text":
            parts[-1]["text"] += text
        else:
            parts.append({"type": "text", "text": text})

    pos = 0
    for match in ANNOTATION_RE.finditer(answer):
        add_text(answer[pos:match.start()])
        expr, eq, result = match.group(1).rpartition("=")
        if eq and expr.strip():
            parts.append({"type": "python", "text": expr.strip()})
            parts.append({"type": "python_output", "text": result.strip()})
        else:  # not of the form expr=result: keep it as plain text
            add_text(match.group(0))
        pos = match.end()
    add_text(answer[pos:])
    return parts


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, subset="main", split="train", data_files=None, shuffle_seed=42, **kwargs):
        super().__init__(**kwargs)
        assert subset in ("main", "socratic"), f"GSM8K subset must be main or socratic, got {subset!r}"
        assert split in ("train", "test"), f"GSM8K split must be train or test, got {split!r}"
        self.subset, self.split = subset, split
        self.rows = shuffled(load_rows("openai/gsm8k", subset, split, data_files=data_files), shuffle_seed)  # upstream's order

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": [
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": parse_calculator_annotations(row["answer"])},
        ]}

    def evaluate(self, conversation, assistant_response):
        """True iff the number after '####' in the response equals the gold one."""
        return evaluate_final_number(conversation, assistant_response)

    def reward(self, conversation, assistant_response):
        return float(self.evaluate(conversation, assistant_response))
