"""
HumanEval (openai/openai_humaneval): 164 Python functions to complete, split "test" only.
Rows: task_id, prompt (signature + docstring), canonical_solution (the body), test (defines
check(candidate)), entry_point (the function name).
The conversation asks for the function; the reference answer is the prompt plus the canonical
body. evaluate() runs prompt + completion + test + check(entry_point) in the sandbox of
nanochat.execution (time limit) and passes iff it exits cleanly.
"""

import re

from tasks.common import Task, load_rows, shuffled

CODE_BLOCK_RE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)  # a reply cut off before its closing fence still counts


def extract_program(response):
    """The code in a model response: the first ```python fenced block (closed or running to the end) if
    there is one, else all of it."""
    match = CODE_BLOCK_RE.search(response)
    if match is None:
        return response
    return match.group(1) if match.group(0).endswith("```") else re.sub(r"`{1,2}\Z", "", match.group(1))  # cut mid-fence


def build_program(conversation, completion):
    """prompt + completion + tests + the call that runs them. The completion may be the whole
    function (it redefines the prompt's stub) or only its body (it continues the prompt)."""
    prompt = conversation["prompt"]
    joint = "" if prompt.endswith("\n") or completion[:1] in (" ", "\t", "\n") else "\n"  # a full def must start a line
    return prompt + joint + completion + "\n\n" + conversation["test"] + "\n\n" + f"check({conversation['entry_point']})\n"


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, split="test", data_files=None, shuffle_seed=42, **kwargs):
        super().__init__(**kwargs)
        assert split == "test", "HumanEval has only the test split"
        self.rows = shuffled(load_rows("openai/openai_humaneval", "openai_humaneval", split, data_files=data_files), shuffle_seed)  # upstream's order

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        user = "Complete this Python function. Reply with the whole function.\n\n" + row["prompt"]
        solution = row["prompt"] + row["canonical_solution"]
        return {
            "messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": f"```python\n{solution.rstrip()}\n```"}],
            "task_id": row["task_id"], "prompt": row["prompt"], "test": row["test"], "entry_point": row["entry_point"],
        }

    def evaluate(self, conversation, assistant_response, timeout=5.0):
        from nanochat.execution import execute_code  # written by the lead; imported only when executing
        program = build_program(conversation, extract_program(assistant_response))
        return bool(execute_code(program, timeout=timeout).success)
