import re
import json
import math
import random

import pytest
import torch

from conftest import stdlib_texts
from test_dataloader import ByteTokenizer, BOS, env, make_dataset, set_rank, full_rows, segments, take  # noqa: F401 (env: autouse)
from nanochat.common import UserError
from nanochat.dataloader import bos_bestfit_loader
from nanochat.longrange import KINDS, TRAIN_DEPTH, LongRangeDoc, make_document, mix_documents, fill_slack
from nanochat.tokenizer import RustBPETokenizer

FILLER = stdlib_texts(30)
FACT_HEADS = {"passkey": "The pass key is ", "kv-recall": "Remember these keys and values.\n",
              "variable": "", "needle": "The magic "}
QUESTION_TAILS = {"passkey": "What is the pass key? The pass key is", "kv-recall": ":",
                  "variable": "==", "needle": " is"}


class StrByteTokenizer(ByteTokenizer):
    """test_dataloader's ByteTokenizer that also encodes one str (the loader counts tokens that way)."""

    def encode(self, texts, prepend=None):
        if isinstance(texts, str):
            return super().encode([texts], prepend)[0]
        return super().encode(texts, prepend)


def count_bytes(text):
    return len(text.encode("utf-8"))


@pytest.fixture(scope="module")
def count_bpe(tiny_base_dir):
    tokenizer = RustBPETokenizer.from_directory(str(tiny_base_dir / "tokenizer"))
    return lambda text: len(tokenizer.encode(text))


def fact_start(doc):
    return round(doc.depth * len(doc.prompt))


def check_document(doc, kind, n_tokens, count_tokens):
    assert isinstance(doc, LongRangeDoc) and doc.kind == kind
    assert doc.text == doc.prompt + doc.answer
    assert doc.answer.strip(" .") and doc.answer.startswith(" ")
    assert doc.prompt.endswith(QUESTION_TAILS[kind])
    start = fact_start(doc)  # the fact starts exactly where depth says and holds the answer
    assert doc.prompt[start:].startswith(FACT_HEADS[kind])
    assert start <= doc.prompt.find(doc.answer.rstrip("."), start) < start + 400
    assert 0.8 * n_tokens <= count_tokens(doc.text) <= n_tokens

# -----------------------------------------------------------------------------
# documents


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n_tokens", [200, 1000, 3000])
def test_documents_fill_the_budget_with_the_fact_near_the_top(kind, n_tokens, count_bpe):
    within_slack = 0
    for seed in range(6):
        doc = make_document(kind, random.Random(seed), FILLER, n_tokens, count_bpe)
        check_document(doc, kind, n_tokens, count_bpe)
        assert 0.0 <= doc.depth <= TRAIN_DEPTH + 0.02
        within_slack += count_bpe(doc.text) >= n_tokens - fill_slack(n_tokens)
    assert within_slack >= 5  # the document normally ends within a few tokens of the budget


@pytest.mark.parametrize("kind", KINDS)
def test_byte_counts_and_a_short_filler_cycled(kind):
    short = ["one two three four five six.", "seven eight nine ten"]
    for seed, n_tokens in enumerate([150, 400, 2500]):
        doc = make_document(kind, random.Random(seed), short, n_tokens, count_bytes)
        check_document(doc, kind, n_tokens, count_bytes)
        assert doc.prompt.count("seven eight") >= 2 or n_tokens < 400  # the filler was cycled


@pytest.mark.parametrize("kind", ["passkey", "needle", "variable"])
def test_depth_is_placed_where_asked(kind, count_bpe):
    depths = []
    for d in [0.0, 0.25, 0.5, 0.75, 1.0]:
        doc = make_document(kind, random.Random(7), FILLER, 2000, count_bpe, depth=d)
        check_document(doc, kind, 2000, count_bpe)
        assert abs(doc.depth - d) < 0.03
        depths.append(doc.depth)
    assert depths[0] == 0.0 and depths == sorted(depths)


def test_deterministic_given_the_seed(count_bpe):
    for kind in KINDS:
        a = make_document(kind, random.Random(3), FILLER, 500, count_bpe)
        random.seed(12345)  # the global random state plays no part
        b = make_document(kind, random.Random(3), FILLER, 500, count_bpe)
        c = make_document(kind, random.Random(4), FILLER, 500, count_bpe)
        assert a == b and a.text != c.text
    texts = FILLER[:10]
    first = mix_documents(texts, 0.5, 11, 300, count_bpe)
    assert first == mix_documents(texts, 0.5, 11, 300, count_bpe) != mix_documents(texts, 0.5, 12, 300, count_bpe)


def test_mix_documents_round_robin(count_bpe):
    texts = FILLER[:10]
    docs = mix_documents(texts, 0.3, 0, 400, count_bpe)
    assert len(docs) == 3
    assert "What is the pass key?" in docs[0] and "Recall the values." in docs[1] and "\nassert " in docs[2]
    assert all(count_bpe(d) <= 400 for d in docs)
    assert mix_documents(texts, 0.0, 0, 400, count_bpe) == []
    assert len(mix_documents(texts, 1.0, 0, 400, count_bpe)) == 10
    assert mix_documents([], 0.5, 0, 400, count_bpe) == []


def test_bad_input_is_a_one_line_user_error():
    rng = random.Random(0)
    cases = [
        lambda: mix_documents(FILLER, -0.1, 0, 500, count_bytes),
        lambda: mix_documents(FILLER, 1.5, 0, 500, count_bytes),
        lambda: mix_documents(FILLER, math.nan, 0, 500, count_bytes),
        lambda: make_document("haystack", rng, FILLER, 500, count_bytes),
        lambda: make_document("passkey", rng, FILLER, 500, count_bytes, depth=1.5),
        lambda: make_document("passkey", rng, FILLER, 20, count_bytes),
        lambda: make_document("passkey", rng, ["", "  \n"], 500, count_bytes),
    ]
    for case in cases:
        with pytest.raises(UserError) as e:
            case()
        assert "\n" not in str(e.value)

# -----------------------------------------------------------------------------
# the loader with long_range_frac > 0

SYNTHETIC = re.compile(r"(What is the pass key\? The pass key is \d+\.|\nvalue of \w+: [0-9a-f]{6}|"
                       r"\nassert \w+ == (\d+|\"[a-z]+-\d+\"))$")


def decode(segment):
    return bytes(t - 1 for t in segment[1:]).decode("utf-8", "replace")


def synthetic_segments(batches):
    """Decoded whole synthetic documents in the batches' rows (each ends with its answer)."""
    found = []
    for inputs, targets, _ in batches:
        for row in full_rows(inputs.cpu(), targets.cpu()):
            found += [decode(s) for s in segments(row) if SYNTHETIC.search(decode(s))]
    return found


def test_loader_packs_synthetic_documents_whole():
    T, B = 256, 2
    texts = make_dataset([[6, 6, 6], [6, 5], [4]], max_len=2 * T, seed=1)
    batches = take(bos_bestfit_loader(StrByteTokenizer(), B, T, "train", buffer_size=8, long_range_frac=0.5), 30)
    found = synthetic_segments(batches)
    assert len(found) >= 10
    for marker in ("What is the pass key?", "Recall the values.", "\nassert "):  # all three training kinds
        assert any(marker in d for d in found)
    for doc in found:
        assert 0.8 * T <= count_bytes(doc) <= T  # with its BOS: at most one row of T + 1 tokens
        key = re.search(r"The pass key is (\d+)\.$", doc)
        assert key is None or doc.count(f"The pass key is {key.group(1)}.") == 2  # the fact, and the answer
    # synthetic rows are referenced after the real rows of their row group
    real_rows = {}
    for pq_idx, rg_idx, row in texts:
        real_rows[(pq_idx, rg_idx)] = max(real_rows.get((pq_idx, rg_idx), 0), row + 1)
    refs = [ref for _, _, s in batches for ref in s["buffer"]]
    assert any(row >= real_rows[(pq_idx, rg_idx)] for pq_idx, rg_idx, row in refs)


@pytest.mark.parametrize("buffer_size", [1, 8, 1000])
def test_exact_resume_with_synthetic_documents(buffer_size):
    T, B = 128, 2
    make_dataset([[6, 6, 6], [6, 5], [4]], max_len=2 * T, seed=1)
    loader = lambda state=None: bos_bestfit_loader(StrByteTokenizer(), B, T, "train", resume_state_dict=state,
                                                   buffer_size=buffer_size, long_range_frac=0.4)
    ref = take(loader(), 40)
    synthetic = [k for k in range(33) if any(row >= 6 for _, _, row in ref[k][2]["buffer"])]  # rows 0..5 are real
    past_wrap = [k for k in synthetic if ref[k][2]["epoch"] >= 2]
    assert synthetic and past_wrap  # resume points with synthetic documents buffered, one past an epoch wrap
    ks = sorted({0, 9, 17, synthetic[0], past_wrap[0], synthetic[-1]})
    for k in ks:
        resumed = take(loader(json.loads(json.dumps(ref[k][2]))), 6)
        for (x0, y0, s0), (x1, y1, s1) in zip(ref[k + 1:k + 7], resumed):
            assert torch.equal(x0, x1) and torch.equal(y0, y1) and s0 == s1


def test_synthetic_documents_do_not_depend_on_rank(monkeypatch):
    T, B = 128, 2
    make_dataset([[4, 4, 4], [4, 4], [3]], max_len=T, seed=2)
    one = set(synthetic_segments(take(bos_bestfit_loader(StrByteTokenizer(), B, T, "train", buffer_size=4,
                                                         long_range_frac=0.5), 60)))
    set_rank(monkeypatch, 1, 2)
    two = set(synthetic_segments(take(bos_bestfit_loader(StrByteTokenizer(), B, T, "train", buffer_size=4,
                                                         long_range_frac=0.5), 30)))
    assert two and two <= one


def test_frac_zero_is_the_plain_loader():
    T, B = 32, 2
    make_dataset([[6, 6, 6], [6, 5], [4]], max_len=2 * T, seed=1)
    plain = take(bos_bestfit_loader(ByteTokenizer(), B, T, "train", buffer_size=8), 25)
    zero = take(bos_bestfit_loader(ByteTokenizer(), B, T, "train", buffer_size=8, long_range_frac=0.0,
                                   long_range_tokens=5), 25)
    for (x0, y0, s0), (x1, y1, s1) in zip(plain, zero):
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and s0 == s1


def test_loader_with_a_real_tokenizer(base_dir):
    tokenizer = RustBPETokenizer.from_directory(str(base_dir / "tokenizer"))
    T, B = 256, 4
    batches = take(bos_bestfit_loader(tokenizer, B, T, "train", buffer_size=16, long_range_frac=0.3,
                                      long_range_tokens=200), 6)
    texts = [tokenizer.decode(row) for x, y, _ in batches for row in full_rows(x, y)]
    assert any("What is the pass key? The pass key is" in t for t in texts)


def test_loader_bad_settings():
    T = 128
    make_dataset([[4, 4], [3]], max_len=T)
    for kwargs in ({"long_range_frac": 1.5}, {"long_range_frac": -0.2}, {"long_range_frac": math.nan},
                   {"long_range_frac": 0.1, "long_range_tokens": T + 2}):
        with pytest.raises(UserError):
            next(bos_bestfit_loader(StrByteTokenizer(), 1, T, "train", **kwargs))


def test_fact_base_questions_end_where_the_value_starts():
    import random
    from nanochat.longrange import FACT_KINDS, fact_base, fact_documents, fact_question, fact_statement
    facts = fact_base(random.Random(3), 20)
    assert len(facts) == 20 * len(FACT_KINDS) and len({f.entity for f in facts}) == 20
    docs = fact_documents(facts)
    for f in facts:
        statement = fact_statement(f)
        assert statement in docs[f.entity]
        tail = fact_question(f).split("? ", 1)[1]  # the question ends with the statement's words before the value
        assert statement == f"{tail} {f.value}."
    assert fact_base(random.Random(3), 20) == facts  # seeded: the same base every run
