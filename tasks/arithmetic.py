"""
Synthetic arithmetic word problems, generated offline, answered with the calculator tool in
the GSM8K format: worked text, "python" parts holding the expressions, "python_output" parts
holding their values, and a final line "#### <number>".

Item i of a split is a pure function of (seed, split, i). Which split a problem belongs to is
decided by a hash of its question text (1 in 10 go to "test"), and generation retries until it
draws a question of the right split, so train and test never share a question.
Values are always whole numbers, written the way nanochat.engine.calculator prints them.
"""

import random

from tasks.common import Task, stable_hash, in_split, evaluate_final_number

NAMES = ["Ava", "Ben", "Chloe", "Dan", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kira", "Leo",
         "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yusuf", "Zoe"]
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "stamps", "shells", "coins", "cards",
         "eggs", "beads", "candles", "plums", "buttons", "tickets"]
CONTAINERS = ["boxes", "bags", "jars", "crates", "packs", "baskets", "trays"]


def _add(rng):
    name, items = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 500), rng.randint(2, 500)
    q = f"{name} has {a} {items}. A friend gives {name} {b} more. How many {items} does {name} have now?"
    return q, [(f"{name} now has {a} + {b} = ", f"{a} + {b}", a + b, f" {items}.")]


def _sub(rng):
    name, items = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(20, 900)
    b = rng.randint(1, a - 1)
    q = f"{name} had {a} {items} and gave away {b} of them. How many {items} does {name} have left?"
    return q, [(f"{name} has {a} - {b} = ", f"{a} - {b}", a - b, f" {items} left.")]


def _mul(rng):
    name, items, box = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(CONTAINERS)
    a, b = rng.randint(2, 40), rng.randint(2, 60)
    q = f"{name} buys {a} {box} of {items}. Each of the {box} holds {b} {items}. How many {items} did {name} buy?"
    return q, [(f"{name} bought {a} * {b} = ", f"{a} * {b}", a * b, f" {items}.")]


def _div(rng):
    name, items = rng.choice(NAMES), rng.choice(ITEMS)
    each, friends = rng.randint(2, 50), rng.randint(2, 12)
    total = each * friends
    q = f"{name} shares {total} {items} equally among {friends} friends. How many {items} does each friend get?"
    return q, [(f"Each friend gets {total} / {friends} = ", f"{total} / {friends}", each, f" {items}.")]


def _packs(rng):  # two steps: the second call uses the first call's result
    name, items, box = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(CONTAINERS)
    a, b, c = rng.randint(1, 200), rng.randint(2, 20), rng.randint(2, 30)
    q = (f"{name} has {a} {items} and then buys {b} {box} with {c} {items} in each. "
         f"How many {items} does {name} have in total?")
    return q, [(f"The {box} hold {b} * {c} = ", f"{b} * {c}", b * c, f" {items}. "),
               (f"In total {name} has {a} + {b * c} = ", f"{a} + {b * c}", a + b * c, f" {items}.")]


def _change(rng):  # two steps: cost, then change
    name, items = rng.choice(NAMES), rng.choice(ITEMS)
    price, count = rng.randint(1, 25), rng.randint(2, 12)
    cost = price * count
    paid = rng.choice([p for p in (20, 50, 100, 200, 500) if p >= cost])
    q = (f"One of the {items} costs ${price}. {name} buys {count} of them and pays with ${paid}. "
         f"How many dollars of change does {name} get?")
    return q, [(f"The {items} cost {count} * {price} = ", f"{count} * {price}", cost, " dollars. "),
               (f"The change is {paid} - {cost} = ", f"{paid} - {cost}", paid - cost, " dollars.")]


TEMPLATES = [_add, _sub, _mul, _div, _packs, _change]


def make_problem(rng):
    """-> (question, steps), steps = [(text before the call, expression, value, text after the value)]."""
    return rng.choice(TEMPLATES)(rng)


def problem_conversation(question, steps):
    parts, text = [], ""  # text: pending text, flushed before each tool call
    for before, expr, value, after in steps:
        parts.append({"type": "text", "text": text + before})
        parts.append({"type": "python", "text": expr})
        parts.append({"type": "python_output", "text": str(value)})
        text = f"{value}{after}"
    answer = steps[-1][2]
    parts.append({"type": "text", "text": f"{text}\n#### {answer}"})
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
            "answer": answer}


class Arithmetic(Task):
    """Arithmetic word problems solved with the calculator; size is how many items the split serves."""
    eval_type = "generative"

    def __init__(self, split="train", size=10000, seed=0, **kwargs):
        super().__init__(**kwargs)
        assert split in ("train", "test"), f"Arithmetic split must be train or test, got {split!r}"
        self.split, self.size, self.seed = split, size, seed

    def num_examples(self):
        return self.size

    def get_example(self, index):
        for attempt in range(1000):
            rng = random.Random(stable_hash("arithmetic", self.seed, self.split, index, attempt))
            question, steps = make_problem(rng)
            if in_split(question, self.split):
                return problem_conversation(question, steps)
        raise RuntimeError("no problem of this split in 1000 draws")  # ~1e-46 for test, never in practice

    def evaluate(self, conversation, assistant_response):
        """True iff the number after '####' in the response is the answer."""
        return evaluate_final_number(conversation, assistant_response)

    def reward(self, conversation, assistant_response):
        return float(self.evaluate(conversation, assistant_response))
