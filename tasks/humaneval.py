"""
HumanEval (openai/openai_humaneval): 164 Python functions to complete, split "test" only.
Rows: task_id, prompt (signature + docstring), canonical_solution (the body), test (defines
check(candidate)), entry_point (the function name).

Two scoring rules, named so a figure says which it is:
- rule="upstream" (chat_eval's "HumanEval", the one ChatCORE averages, as upstream nanochat scores it):
  the user message is the bare prompt; the program run is the prompt's leading import lines + the reply's
  first closed ```python block (stripped; the whole reply stripped if it has none) + the tests + check().
  A body that continues the prompt, or a helper the prompt defines, is lost here, so it reads lower than:
- rule="harness" (chat_eval's "HumanEval-harness", the official harness's program): the user message asks
  for the whole function; the program is prompt + reply's code + tests + check(), so a reply may be the
  whole function (it redefines the stub) or only its body; a reply cut before its closing fence still runs.
evaluate() runs the program in nanochat.execution's sandbox (time limit) and passes iff it exits cleanly.
"""

import re

from tasks.common import Task, load_rows, shuffled

CODE_BLOCK_RE = re.compile(r"```[^`\n]*\n(.*?)(?:```|\Z)", re.DOTALL)  # any info string; a reply cut off before its closing fence still counts
UPSTREAM_BLOCK_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)  # closed blocks only


def extract_program(response):
    """The code in a model response (harness rule): the first fenced block, ```python, ```python3 or any other
    info string (closed or running to the end) if there is one, else all of it."""
    match = CODE_BLOCK_RE.search(response)
    if match is None:
        return response
    return match.group(1) if match.group(0).endswith("```") else re.sub(r"`{1,2}\Z", "", match.group(1))  # cut mid-fence


def extract_program_upstream(response):
    """The code in a model response (upstream rule): the first closed fenced block, else the whole reply; stripped."""
    match = UPSTREAM_BLOCK_RE.search(response)
    return (match.group(1) if match else response).strip()


def leading_imports(prompt):
    """The import lines at the top of a prompt (blank and comment lines skipped), up to its first other line."""
    imports = []
    for line in prompt.split("\n"):
        line = line.strip()
        if line.startswith(("import ", "from ")):
            imports.append(line)
        elif line and not line.startswith("#"):
            break
    return "\n".join(imports)


def build_program(conversation, completion):
    """Harness rule: prompt + completion + tests + the call that runs them. The completion may be the whole
    function (it redefines the prompt's stub) or only its body (it continues the prompt)."""
    prompt = conversation["prompt"]
    joint = "" if prompt.endswith("\n") or completion[:1] in (" ", "\t", "\n") else "\n"  # a full def must start a line
    return prompt + joint + completion + "\n\n" + conversation["test"] + "\n\n" + f"check({conversation['entry_point']})\n"


def build_program_upstream(conversation, completion):
    """Upstream rule: the prompt's imports + the extracted code + tests + the call that runs them."""
    return (leading_imports(conversation["prompt"]) + "\n\n" + completion + "\n\n" + conversation["test"] + "\n"
            + f"check({conversation['entry_point']})")


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, split="test", data_files=None, shuffle_seed=42, rule="upstream", **kwargs):
        super().__init__(**kwargs)
        assert split == "test", "HumanEval has only the test split"
        assert rule in ("upstream", "harness"), f"rule must be 'upstream' or 'harness', got {rule!r}"
        self.rule = rule
        self.rows = shuffled(load_rows("openai/openai_humaneval", "openai_humaneval", split, data_files=data_files), shuffle_seed)  # upstream's order

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        if self.rule == "upstream":  # the bare prompt; the reference answer is the prompt and the body
            user, answer = row["prompt"], row["prompt"] + "\n" + row["canonical_solution"]
        else:
            user = "Complete this Python function. Reply with the whole function.\n\n" + row["prompt"]
            answer = f"```python\n{(row['prompt'] + row['canonical_solution']).rstrip()}\n```"
        return {
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            "task_id": row["task_id"], "prompt": row["prompt"], "test": row["test"], "entry_point": row["entry_point"],
        }

    def evaluate(self, conversation, assistant_response, timeout=5.0):
        from nanochat.execution import execute_code  # written by the lead; imported only when executing
        if self.rule == "upstream":
            program = build_program_upstream(conversation, extract_program_upstream(assistant_response))
        else:
            program = build_program(conversation, extract_program(assistant_response))
        return bool(execute_code(program, timeout=timeout).success)
