"""
Synthetic long-range documents: a fact near the top (or at a chosen depth), natural filler
text around it, and a question at the very end whose answer is the fact. Mixed into pretraining (dataloader.py,
long_range_frac) they give the model a reason to look far back; `needle` is the eval kind.

Kinds (each document is prompt + answer; the answer is the final span, the fact's value):
- passkey:   "The pass key is 48213. Remember it. ..." filler "... The pass key is" -> " 48213."
- kv-recall: a list of 8-20 `key: value` pairs (random words: hex ids), filler, then a few
             "value of <key>: <value>" lines; the last value is the answer.
- variable:  `<name> = <literal>` as Python, filler, then `assert <name> ==` -> " <literal>".
- needle:    "The magic city is Zanzibar-417." at a chosen depth, the question at the end.

Sizes are in tokens of the caller's tokenizer (count_tokens(text) -> int): a document never
exceeds n_tokens and normally ends at most fill_slack(n_tokens) <= 16 tokens short of it, so a
document of a whole row puts its answer in the row's last 16 tokens (inside any MegaContext
horizon). Counting is done a few times per document on the whole text (never per word): a first
guess of 4 characters per token, then secant steps on the measured ratio (5 counts typical, at
most 1 + FIT_TRIES). Depth is measured in characters: where the fact starts, as a fraction of the
prompt's length.
"""

import random
from dataclasses import dataclass

from nanochat.common import UserError

KINDS = ("passkey", "kv-recall", "variable", "needle")
TRAIN_KINDS = ("passkey", "kv-recall", "variable")  # mix_documents' round robin; needle is kept for eval
TRAIN_DEPTH = 0.2     # depth=None: the fact sits at a random depth in [0, TRAIN_DEPTH]
FIT_TRIES = 12        # token counts per document at most (after the one of the bare skeleton)
SEP = "\n\n"          # between filler, fact, filler and question

CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
CODE_WORDS = ("max", "min", "num", "total", "buffer", "retry", "limit", "count", "offset", "scale", "index",
              "width", "depth", "batch", "cache", "token", "queue", "timeout", "level", "seed", "port", "step")
NEEDLE_THINGS = ("city", "number", "animal", "color", "fruit", "river", "planet", "instrument", "word", "stone")


class TooShort(UserError):
    """A document of `kind` needs `needed` tokens (its fact, question and answer without filler), more than `n_tokens`."""
    def __init__(self, kind, needed, n_tokens):
        super().__init__(f"a {kind} long-range document needs at least {needed} tokens, more than the {n_tokens} asked for")
        self.kind, self.needed = kind, needed


@dataclass
class LongRangeDoc:
    text: str    # == prompt + answer
    prompt: str  # everything before the answer (ends with the question)
    answer: str  # the final span to recall, e.g. " 48213."
    kind: str
    depth: float  # where the fact starts, as a fraction of len(prompt)


def random_word(rng, syllables):
    return "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(syllables))


def fact_question_answer(kind, rng, n_tokens, count_tokens):
    """The kind's fixed parts: (fact, question, answer); the prompt ends with the question."""
    if kind == "passkey":
        key = str(rng.randint(10000, 99999))
        return (f"The pass key is {key}. Remember it. {key} is the pass key.",
                "What is the pass key? The pass key is", f" {key}.")
    if kind == "kv-recall":
        keys = []
        for _ in range(rng.randint(8, 20)):
            key = random_word(rng, rng.randint(2, 4))
            keys.append(key if key not in keys else f"{key}{len(keys)}")  # keys are unique
        values = [f"{rng.getrandbits(24):06x}" for _ in keys]
        order = rng.sample(range(len(keys)), len(keys))  # the keys asked for: the first few of order in range
        n_asked = rng.randint(1, 3)
        m = len(keys)
        while True:  # a short document gets the first m pairs only: the list takes at most half of it
            asked = [i for i in order if i < m][:n_asked]
            fact = "Remember these keys and values.\n" + \
                   "\n".join(f"{k}: {v}" for k, v in zip(keys[:m], values[:m]))
            queries = [f"value of {keys[i]}: {values[i]}" for i in asked[:-1]] + [f"value of {keys[asked[-1]]}:"]
            question = "Recall the values.\n" + "\n".join(queries)
            answer = f" {values[asked[-1]]}"
            if m == 1 or count_tokens(fact + SEP + question + answer) <= n_tokens // 2:
                return fact, question, answer
            m //= 2
    if kind == "variable":
        name = f"{rng.choice(CODE_WORDS)}_{rng.choice(CODE_WORDS)}_{rng.randint(10, 99)}"
        if rng.random() < 0.5:
            literal = str(rng.randint(1000, 99999))
        else:
            literal = f'"{random_word(rng, 3)}-{rng.randint(10, 999)}"'
        return f"{name} = {literal}", f"assert {name} ==", f" {literal}"
    assert kind == "needle", kind
    thing = rng.choice(NEEDLE_THINGS)
    value = f"{random_word(rng, 3).capitalize()}-{rng.randint(100, 999)}"
    return (f"The magic {thing} is {value}.",
            f"What is the magic {thing}? The magic {thing} is", f" {value}.")


def fill_slack(n_tokens):
    """How many tokens short of n_tokens a document may end: 1/64 of it, 1 to 16."""
    return min(16, max(1, n_tokens // 64))


def snap(text, i, lines=True):
    """A cut index at or before i that ends text[:cut] at a line end (if lines; within 1/50 of
    the text) or else a word end (within 16 chars), else i: filler is cut between words."""
    i = max(0, min(i, len(text)))
    if i == len(text) or i == 0:
        return i
    for sep, reach in (("\n", min(200, len(text) // 50) if lines else 0), (" ", 16)):
        j = text.rfind(sep, max(0, i - reach), i + 1)
        if j > 0:
            return j
    return i


def make_document(kind, rng, filler, n_tokens, count_tokens, depth=None):
    """One LongRangeDoc of kind whose text counts <= n_tokens tokens (normally >= n_tokens -
    fill_slack(n_tokens)), with filler from the texts `filler` (cycled from a random one) and
    the fact at `depth` (a fraction of the prompt), or at a random depth in [0, TRAIN_DEPTH] if
    None. Deterministic given rng's state."""
    if kind not in KINDS:
        raise UserError(f"unknown long-range document kind {kind!r}; expected one of {', '.join(KINDS)}")
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise UserError(f"long-range document depth must be in [0, 1], got {depth}")
    sources = [t.strip() for t in filler if t and t.strip()]
    if not sources:
        raise UserError("long-range documents need filler text, and every filler text given is empty")
    fact, question, answer = fact_question_answer(kind, rng, n_tokens, count_tokens)
    depth = rng.uniform(0.0, TRAIN_DEPTH) if depth is None else depth
    start = rng.randrange(len(sources))

    def assemble(f):
        """(prompt, depth) with the filler f split around the fact at the wanted depth."""
        total = len(f) + len(fact) + len(question) + 3 * len(SEP)  # about the prompt's length
        cut = snap(f, round(depth * total))
        before, after = f[:cut].rstrip(), f[cut:].lstrip()
        prompt = SEP.join(part for part in (before, fact, after, question) if part)
        return prompt, (len(before) + len(SEP)) / len(prompt) if before else 0.0

    bare = count_tokens(assemble("")[0] + answer)
    if bare > n_tokens:
        raise TooShort(kind, bare, n_tokens)
    pool, i = "", start  # the filler texts from sources[start] on, cycled, joined by SEP

    def filler_of(chars, floor):
        """About the first `chars` chars of the pool without trailing whitespace: cut back to a
        word end, or else forward to the next non-space char, so that it is longer than floor."""
        nonlocal pool, i
        while len(pool) < chars + 1 or not pool[floor:].strip():
            pool += (SEP if pool else "") + sources[i % len(sources)]
            i += 1
        f = pool[:snap(pool, chars, lines=False)].rstrip()
        if len(f) <= floor:
            nonspace = floor + len(pool[floor:]) - len(pool[floor:].lstrip())  # pool[nonspace] is not a space
            f = pool[:max(chars, nonspace + 1)].rstrip()
        return f

    # Search the filler length: lo chars fit (best), hi chars do not; each try aims a secant step
    # (the measured chars per filler token) at the middle of the window [n_tokens - slack, n_tokens].
    slack = fill_slack(n_tokens)
    best, lo, hi, f = "", 0, None, None
    chars = (n_tokens - bare) * 4  # first guess: 4 chars per token
    for _ in range(FIT_TRIES):
        f_prev, f = f, filler_of(chars, lo)
        if f == f_prev:  # no filler length between lo and hi (a run of spaces): lo is the best there is
            break
        n = count_tokens(assemble(f)[0] + answer)
        if n <= n_tokens:
            best, lo = f, len(f)
            if n >= n_tokens - slack:
                break
        else:
            hi = len(f)
        chars = round(len(f) + (n_tokens - slack / 2 - n) * len(f) / max(n - bare, 1))
        chars = max(lo + 1, chars if hi is None else min(chars, hi - 1))
        if hi is not None and hi - lo <= 1:
            break
    prompt, fact_depth = assemble(best)
    return LongRangeDoc(text=prompt + answer, prompt=prompt, answer=answer, kind=kind, depth=fact_depth)


def mix_documents(texts, frac, seed, n_tokens, count_tokens):
    """The synthetic documents to add to one row group's texts: round(frac * len(texts)) of
    them, kinds passkey / kv-recall / variable in turn, filler from texts, random state from
    seed alone (so a resume regenerates them exactly)."""
    if not 0.0 <= frac <= 1.0:
        raise UserError(f"the long-range document fraction must be in [0, 1], got {frac}")
    count = round(frac * len(texts))
    if count == 0:
        return []
    rng = random.Random(seed)
    return [make_document(TRAIN_KINDS[j % len(TRAIN_KINDS)], rng, texts, n_tokens, count_tokens).text
            for j in range(count)]


def num_answers(kind):
    """How many different answers a document of kind can ask for: the values fact_question_answer
    draws (keep the two in step). 1 / num_answers is the chance of guessing the answer blind."""
    if kind not in KINDS:
        raise UserError(f"unknown long-range document kind {kind!r}; expected one of {', '.join(KINDS)}")
    word3 = (len(CONSONANTS) * len(VOWELS)) ** 3  # random_word(rng, 3)
    return {"passkey": 99999 - 10000 + 1,               # randint(10000, 99999)
            "kv-recall": 16 ** 6,                       # 24 random bits as 6 hex digits
            "variable": (99999 - 1000 + 1) + word3 * (999 - 10 + 1),  # an int literal or "<word3>-<10..999>"
            "needle": word3 * (999 - 100 + 1)}[kind]    # "<Word3>-<100..999>"


# -----------------------------------------------------------------------------
# A synthetic fact base (scripts/mc_eval.py --task ck): entities with attributes, read from a
# Core-Knowledge memory. Each entity has one document stating its facts; a question about a fact
# ends where its value starts, so the value is the answer.

FACT_KINDS = {  # attribute -> (statement, question): {e} the entity, {v} the value
    "city": ("{e} lives in {v}.", "Where does {e} live? {e} lives in"),
    "job": ("{e} works as a {v}.", "What is the job of {e}? {e} works as a"),
    "color": ("The favorite color of {e} is {v}.", "What is the favorite color of {e}? The favorite color of {e} is"),
}
JOBS = ("baker", "pilot", "farmer", "doctor", "teacher", "painter", "sailor", "miner", "weaver", "judge", "singer", "tailor")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "brown", "gray", "pink", "silver")


@dataclass
class Fact:
    entity: str
    attribute: str  # a key of FACT_KINDS
    value: str


def fact_value(attribute, rng):
    """A random value of the attribute: a made-up city, or a job / color from the lists."""
    if attribute == "city":
        return random_word(rng, 3).capitalize()
    return rng.choice(JOBS if attribute == "job" else COLORS)


def fact_base(rng, n_entities):
    """n_entities made-up people (unique names), each with one fact per attribute of FACT_KINDS."""
    names = set()
    while len(names) < n_entities:
        names.add(f"{random_word(rng, 2).capitalize()} {random_word(rng, 3).capitalize()}")
    return [Fact(name, attribute, fact_value(attribute, rng)) for name in sorted(names) for attribute in FACT_KINDS]


def fact_statement(fact):
    return FACT_KINDS[fact.attribute][0].format(e=fact.entity, v=fact.value)


def fact_question(fact):
    """The question, ending right before the value: the answer is ' ' + fact.value."""
    return FACT_KINDS[fact.attribute][1].format(e=fact.entity)


def fact_documents(facts):
    """One document per entity, its facts' statements in order: {entity: text}."""
    docs = {}
    for fact in facts:
        docs[fact.entity] = (docs[fact.entity] + " " if fact.entity in docs else "") + fact_statement(fact)
    return docs
