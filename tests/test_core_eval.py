"""
CORE evaluation: a tiny bundle of all three task types is zipped, served from 127.0.0.1,
downloaded, extracted and scored. The scoring is checked with "answer key" models that
read the prompt and put a large logit on the next character of a chosen answer: the gold
answer must give accuracy 1, a wrong one accuracy 0.
"""

import io
import os
import re
import json
import random
import socket
import zipfile
import threading
import http.server
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

from nanochat.common import UserError
from nanochat import core_eval
from nanochat.core_eval import (
    centered_accuracy, evaluate_core, evaluate_example, evaluate_task, get_eval_bundle,
    download_file, load_bundle_tasks, sample_fewshot, tokenize_sequences, common_prefix_len,
    common_suffix_len,
)

# -----------------------------------------------------------------------------
# A character-level tokenizer (ASCII ids 0..127, BOS 128) and answer-key models

BOS = 128
VOCAB = 130


class CharTokenizer:
    def get_bos_token_id(self):
        return BOS

    def encode(self, text, prepend=None, append=None, num_threads=8):
        if isinstance(text, list):
            return [self.encode(t, prepend, append) for t in text]
        ids = [ord(c) for c in text]
        assert all(i < 128 for i in ids), "test text must be ASCII"
        return ([prepend] if prepend is not None else []) + ids + ([append] if append is not None else [])

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i != BOS)


class WordTokenizer:
    """Pieces like " Paris" keep their leading space (as BPE split patterns do)."""

    def __init__(self):
        self.vocab = {"<bos>": 0}

    def get_bos_token_id(self):
        return 0

    def encode(self, text, prepend=None, append=None, num_threads=8):
        if isinstance(text, list):
            return [self.encode(t, prepend, append) for t in text]
        pieces = re.findall(r" ?[^\s]+|\s+", text)
        ids = [self.vocab.setdefault(p, len(self.vocab)) for p in pieces]
        return ([prepend] if prepend is not None else []) + ids


class AnswerKeyModel(torch.nn.Module):
    """key: {prompt text: answer text}. After the latest occurrence of any prompt, while the
    text so far is a prefix of its answer, the next answer character gets logit 20. max_seq_len:
    a hard limit it declares (as upstream's Hugging Face wrappers do), or None."""

    def __init__(self, key, max_seq_len=None):
        super().__init__()
        self.key = key
        self.max_seq_len = max_seq_len
        self.max_T_seen = 0

    def forward(self, idx):
        B, T = idx.shape
        self.max_T_seen = max(self.max_T_seen, T)
        logits = torch.zeros(B, T, VOCAB)
        for b in range(B):
            row = idx[b].tolist()
            text = "".join(chr(i) for i in row if i != BOS)
            ends = sorted((m.end(), answer) for prompt, answer in self.key.items()
                          for m in re.finditer(re.escape(prompt), text))
            n_chars = 0  # characters of text up to and including position t
            for t, tok in enumerate(row):
                n_chars += tok != BOS
                live = [(e, a) for e, a in ends if e <= n_chars]
                if not live:
                    continue
                end, answer = live[-1]
                tail = text[end:n_chars]
                if len(tail) < len(answer) and answer.startswith(tail):
                    logits[b, t, ord(answer[len(tail)])] = 20.0
        return logits


# -----------------------------------------------------------------------------
# The tiny bundle

def make_words(n, seed):
    rng = random.Random(seed)
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)))
    return sorted(words)


def make_tasks():
    """[(yaml entry, random baseline %, examples)]: two tasks of each type."""
    w = iter(make_words(400, seed=0))
    rng = random.Random(1)
    tasks = []
    mc1 = [dict(query=f"Q: which word is tagged {next(w)}?\nA:", choices=[next(w) for _ in range(4)], gold=rng.randrange(4)) for _ in range(8)]
    tasks.append((dict(label="mc_four", dataset_uri="mc/four.jsonl", num_fewshot=[3], icl_task_type="multiple_choice", continuation_delimiter=" "), 25.0, mc1))
    mc2 = [dict(query=f"Pick {next(w)}", choices=[next(w) for _ in range(3)], gold=rng.randrange(3)) for _ in range(7)]
    tasks.append((dict(label="mc_three", dataset_uri="mc/three.jsonl", num_fewshot=[0], icl_task_type="multiple_choice", continuation_delimiter="\nAnswer: "), 100 / 3, mc2))
    sc1 = [dict(context_options=[f"{next(w)} met {next(w)}" for _ in range(2)], continuation=f"and both went to {next(w)}.", gold=rng.randrange(2)) for _ in range(8)]
    tasks.append((dict(label="schema_two", dataset_uri="schema/two.jsonl", num_fewshot=[1], icl_task_type="schema", continuation_delimiter=" "), 50.0, sc1))
    sc2 = [dict(context_options=[f"The {next(w)}" for _ in range(3)], continuation=f"is {next(w)}", gold=rng.randrange(3)) for _ in range(6)]
    tasks.append((dict(label="schema_three", dataset_uri="schema/three.jsonl", num_fewshot=[0], icl_task_type="schema"), 100 / 3, sc2))
    lm1 = [dict(context=f"{next(w)} {next(w)} {next(w)}", continuation=f"{next(w)} {next(w)}") for _ in range(8)]
    tasks.append((dict(label="lm_words", dataset_uri="lm/words.jsonl", num_fewshot=[2], icl_task_type="language_modeling", continuation_delimiter=" "), 0.0, lm1))
    lm2 = [dict(context=f"Say {word} backwards: ", continuation=word[::-1]) for word in [next(w) for _ in range(6)]]
    tasks.append((dict(label="lm_reverse", dataset_uri="lm/reverse.jsonl", num_fewshot=[0], icl_task_type="language_modeling", continuation_delimiter=""), 0.0, lm2))
    return tasks


def answer_key(tasks, wrong=False, only=None):
    """{prompt: answer} as the task rules define them; wrong=True keys a wrong answer instead.
    only(example_index) -> bool restricts the wrong answers to some examples."""
    key = {}
    for entry, _, data in tasks:
        delim = entry.get("continuation_delimiter", " ")
        for i, ex in enumerate(data):
            bad = wrong and (only is None or only(i))
            if entry["icl_task_type"] == "multiple_choice":
                pick = (ex["gold"] + 1) % len(ex["choices"]) if bad else ex["gold"]
                key[ex["query"] + delim] = ex["choices"][pick]
            elif entry["icl_task_type"] == "schema":
                pick = (ex["gold"] + 1) % len(ex["context_options"]) if bad else ex["gold"]
                key[ex["context_options"][pick] + delim] = ex["continuation"]
            else:
                # the span starts after the stripped prompt: the delimiter's trailing space is predicted too
                answer = ("X" + ex["continuation"][1:]) if bad else ex["continuation"]
                key[ex["context"].strip() + delim.rstrip()] = delim[len(delim.rstrip()):] + answer
    return key


def build_bundle_zip(tasks):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        icl = "icl_tasks:\n"
        for entry, _, _ in tasks:
            icl += f"- label: {entry['label']}\n  dataset_uri: {entry['dataset_uri']}\n"
            icl += f"  num_fewshot: {entry['num_fewshot']}\n  icl_task_type: {entry['icl_task_type']}\n"
            if "continuation_delimiter" in entry:
                icl += f"  continuation_delimiter: {json.dumps(entry['continuation_delimiter'])}\n"
        zf.writestr("eval_bundle/core.yaml", icl)
        meta = "Eval Task,Task Category,Random baseline\n"
        meta += "".join(f"{entry['label']},test,{baseline}\n" for entry, baseline, _ in tasks)
        zf.writestr("eval_bundle/eval_meta_data.csv", meta)
        for entry, _, data in tasks:
            zf.writestr(f"eval_bundle/eval_data/{entry['dataset_uri']}", "".join(json.dumps(ex) + "\n" for ex in data))
    return buf.getvalue()


class BundleServer:
    """Serves `payload` at /eval_bundle.zip on 127.0.0.1. The first `truncate` responses
    announce the full length but send only half the bytes."""

    def __init__(self, payload, truncate=0):
        self.payload, self.truncate, self.requests = payload, truncate, 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                if self.path != "/eval_bundle.zip":
                    self.send_error(404)
                    return
                body = server.payload
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.requests <= server.truncate:
                    body = body[: len(body) // 2]
                    self.close_connection = True
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/eval_bundle.zip"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def tasks():
    return make_tasks()


@pytest.fixture(scope="module")
def bundle_dir(tasks, tmp_path_factory):
    base = tmp_path_factory.mktemp("base")
    with BundleServer(build_bundle_zip(tasks)) as server:
        return get_eval_bundle(server.url, base_dir=str(base), backoff=0)


# -----------------------------------------------------------------------------
# Bundle download / extraction

def test_download_extract_and_skip_when_present(tasks, tmp_path):
    with BundleServer(build_bundle_zip(tasks)) as server:
        bundle = get_eval_bundle(server.url, base_dir=str(tmp_path), backoff=0)
        assert server.requests == 1
    assert bundle == str(tmp_path / "eval_bundle")
    assert sorted(os.listdir(tmp_path)) == ["eval_bundle", "eval_bundle.zip"]  # no temp leftovers
    loaded = load_bundle_tasks(bundle)
    assert [m["label"] for m, _, _ in loaded] == [e["label"] for e, _, _ in tasks]
    assert [m["continuation_delimiter"] for m, _, _ in loaded] == [" ", "\nAnswer: ", " ", " ", " ", ""]
    assert [m["num_fewshot"] for m, _, _ in loaded] == [3, 0, 1, 0, 2, 0]
    assert loaded[0][2] == tasks[0][2] and loaded[0][1] == 25.0
    # already there: no network needed (the server is gone), for its URL or none
    assert get_eval_bundle(server.url, base_dir=str(tmp_path), retries=1, backoff=0) == bundle
    assert get_eval_bundle(base_dir=str(tmp_path), retries=1, backoff=0) == bundle
    # another URL: refused in one line, not the cached bundle's tasks scored under its name
    with pytest.raises(UserError, match=f"came from {server.url}, not http://127.0.0.1:9/other.zip: remove it"):
        get_eval_bundle("http://127.0.0.1:9/other.zip", base_dir=str(tmp_path), retries=1, backoff=0)


def test_url_from_environment(tasks, tmp_path, monkeypatch):
    with BundleServer(build_bundle_zip(tasks)) as server:
        monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE_URL", server.url)
        get_eval_bundle(base_dir=str(tmp_path), backoff=0)
        assert server.requests == 1


def test_truncated_download_is_retried(tasks, tmp_path):
    payload = build_bundle_zip(tasks)
    with BundleServer(payload, truncate=2) as server:
        path = download_file(server.url, str(tmp_path / "b.zip"), retries=3, backoff=0)
        assert server.requests == 3
    with open(path, "rb") as f:
        assert f.read() == payload
    with BundleServer(payload, truncate=5) as server:
        with pytest.raises(UserError, match="after 2 attempts"):
            download_file(server.url, str(tmp_path / "c.zip"), retries=2, backoff=0)
    assert sorted(os.listdir(tmp_path)) == ["b.zip"]  # a failed download leaves nothing behind


def test_corrupt_zip_is_a_user_error(tasks, tmp_path):
    good = build_bundle_zip(tasks)
    corrupt = good[:100] + bytes(200) + good[300:]  # same length, damaged member data
    for payload in (b"this is not a zip file" * 10, corrupt):
        with BundleServer(payload) as server:
            with pytest.raises(UserError, match="not a valid eval bundle"):
                get_eval_bundle(server.url, base_dir=str(tmp_path), backoff=0)
        assert os.listdir(tmp_path) == []  # zip removed, no half-extracted bundle
    with BundleServer(good) as server:  # a later good download works
        get_eval_bundle(server.url, base_dir=str(tmp_path), backoff=0)


# -----------------------------------------------------------------------------
# Rendering, tokenization, cropping

@pytest.mark.parametrize("damage, names", [
    ("rm eval_data/mc/four.jsonl", "eval_data/mc/four.jsonl: FileNotFoundError"),
    ("cut eval_data/lm/words.jsonl", "eval_data/lm/words.jsonl: JSONDecodeError"),
    ("rm eval_meta_data.csv", "eval_meta_data.csv: FileNotFoundError"),
    ("write core.yaml", "core.yaml: KeyError"),
    ("yaml core.yaml", "core.yaml: ScannerError"),
])
def test_a_damaged_bundle_is_refused_in_one_line_naming_the_file(bundle_dir, tmp_path, damage, names):
    import shutil
    bundle = tmp_path / "eval_bundle"
    shutil.copytree(bundle_dir, bundle)
    verb, name = damage.split()
    path = bundle / name
    if verb == "rm":
        path.unlink()
    elif verb == "cut":
        path.write_bytes(path.read_bytes()[:-20])  # the last line ends mid-string
    elif verb == "write":
        path.write_text("tasks: []\n")  # no icl_tasks
    else:
        path.write_text("icl_tasks:\n  - label: a\n    bad: [unclosed\n\tx: y\n")  # yaml's errors span lines
    with pytest.raises(UserError, match=re.escape(names)) as e:
        load_bundle_tasks(str(bundle))
    assert "\n" not in str(e.value)


def test_evaluate_core_takes_the_same_subset_on_every_call_with_preloaded_tasks(bundle_dir):
    """base_train reads the bundle once and evaluates it every --core-metric-every steps: the shuffle
    that picks --max-per-task examples must not compound across calls."""
    tasks = load_bundle_tasks(bundle_dir)
    before = [list(data) for _, _, data in tasks]
    model = AnswerKeyModel(answer_key(make_tasks(), wrong=True, only=lambda i: i % 2 == 0))
    runs = [evaluate_core(model, CharTokenizer(), "cpu", max_per_task=3, tasks=tasks) for _ in range(2)]
    assert runs[0] == runs[1] and [data for _, _, data in tasks] == before
    assert runs[0] == evaluate_core(model, CharTokenizer(), "cpu", bundle_dir, max_per_task=3)


def test_fewshot_is_deterministic_and_excludes_the_example():
    data = [dict(id=i) for i in range(10)]
    for idx in range(10):
        shots = sample_fewshot(data, idx, 4)
        assert len(shots) == 4 and data[idx] not in shots
        assert len({s["id"] for s in shots}) == 4
        assert shots == sample_fewshot(data, idx, 4)
    assert sample_fewshot(data, 3, 0) == []
    assert len(sample_fewshot(data[:3], 0, 5)) == 2  # capped at the other examples
    assert any(sample_fewshot(data, 0, 4) != sample_fewshot(data, i, 4) for i in range(1, 10))


def test_delimiter_space_merges_into_the_continuation():
    tok = WordTokenizer()
    pairs = [("Capital of France? A: ", "Paris"), ("Capital of France? A: ", "Lyon is")]
    for task_type in ("multiple_choice", "language_modeling"):
        seqs = tokenize_sequences(tok, pairs, task_type)
        for (ids, start, end), word in zip(seqs, [[" Paris"], [" Lyon", " is"]]):
            assert ids[0] == 0 and end == len(ids)
            assert ids[start:end] == [tok.vocab[p] for p in word]
            assert ids[:start] == tok.encode("Capital of France? A:", prepend=0)


def test_common_prefix_and_suffix():
    assert common_prefix_len([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_len([[5, 2], [1, 2]]) == 0
    assert common_suffix_len([[9, 1, 2, 3], [8, 2, 3], [7, 7, 2, 3]]) == 2
    assert common_suffix_len([[1, 2], [1, 3]]) == 0
    assert common_prefix_len([[1, 2]]) == 2 and common_suffix_len([[1, 2]]) == 2


def test_mc_span_skips_tokens_all_choices_share():
    """ " the" starts every choice, so it is context: only " sun" / " moon" are scored."""
    tok = WordTokenizer()
    pairs = [("Q: what shines? A: ", "the sun"), ("Q: what shines? A: ", "the moon")]
    seqs = tokenize_sequences(tok, pairs, "multiple_choice")
    assert [ids[start:end] for ids, start, end in seqs] == [[tok.vocab[" sun"]], [tok.vocab[" moon"]]]
    assert seqs[0][1] == seqs[1][1] == len(tok.encode("Q: what shines? A: the", prepend=0))
    # the language-modeling rule (score after the context) would have scored " the" too
    (ids, start, end), = tokenize_sequences(tok, pairs[:1], "language_modeling")
    assert ids[start:end] == [tok.vocab[" the"], tok.vocab[" sun"]]


def test_schema_span_is_the_common_suffix():
    tok = CharTokenizer()
    pairs = [("The cat ", "sat down"), ("The dog ", "sat down")]
    seqs = tokenize_sequences(tok, pairs, "schema")
    assert [tok.decode(ids[s:e]) for ids, s, e in seqs] == [" sat down", " sat down"]
    # options ending alike: the shared tail of the options is scored too; lengths may differ
    pairs = [("Brightstone ", "ran"), ("Coldstone ", "ran")]
    seqs = tokenize_sequences(tok, pairs, "schema")
    assert [tok.decode(ids[s:e]) for ids, s, e in seqs] == ["stone ran", "stone ran"]
    assert [e for _, _, e in seqs] == [len("Brightstone ran") + 1, len("Coldstone ran") + 1]


def test_degenerate_spans_score_at_least_one_token():
    tok = CharTokenizer()
    (ids, start, end), = tokenize_sequences(tok, [("Q: ", "yes")], "multiple_choice")  # one choice
    assert (start, end) == (len(ids) - 1, len(ids))
    seqs = tokenize_sequences(tok, [("A ", "x"), ("A ", "x")], "schema")  # identical options
    assert all(s == 1 and e == len(ids) for ids, s, e in seqs)


def test_crop_shifts_the_mc_span():
    tok = CharTokenizer()
    context = "long few-shot context " * 4 + "Q: what shines? A: "
    pairs = [(context, "the sun"), (context, "the moonlight")]
    seqs = tokenize_sequences(tok, pairs, "multiple_choice", max_seq_len=16)
    assert [tok.decode(ids[s:e]) for ids, s, e in seqs] == ["sun", "moonlight"]
    assert [tok.decode(ids) for ids, _, _ in seqs] == [(context + c)[-16:] for _, c in pairs]
    assert [s for _, s, _ in seqs] == [16 - 3, 16 - 9]


def test_left_crop_keeps_the_continuation():
    tok = CharTokenizer()
    context, continuation = "a long few-shot context " * 5 + "Q: x? A: ", "answer"
    (ids, start, end), = tokenize_sequences(tok, [(context, continuation)], "language_modeling", max_seq_len=12)
    assert len(ids) == 12 and end == 12
    assert tok.decode(ids[start:end]) == " answer"  # the delimiter space is its own token here: scored, as upstream
    assert tok.decode(ids) == (context + continuation)[-12:]
    # a continuation longer than the window keeps its tail; position 0 is never scored
    (ids, start, end), = tokenize_sequences(tok, [("Q: ", "abcdefghij")], "language_modeling", max_seq_len=5)
    assert tok.decode(ids) == "fghij" and (start, end) == (1, 5)
    # no crop when it fits
    (ids, start, end), = tokenize_sequences(tok, [("Q: ", "ab")], "language_modeling", max_seq_len=12)
    assert ids == [BOS] + tok.encode("Q: ab") and start == 3


def test_lm_span_scores_a_delimiter_space_that_stays_its_own_token():
    """Upstream scores from the end of the stripped prompt: where the space before an answer is a
    token of its own (before digits, here every word of the WordTokenizer after a newline) the
    model must predict it; where it merges into the answer (" Paris") nothing changes."""
    tok = WordTokenizer()
    (ids, start, end), = tokenize_sequences(tok, [("Year?\nAnswer:\n", "1812")], "language_modeling")
    assert ids[:start] == tok.encode("Year?\nAnswer:", prepend=0) and ids[start:end] == tok.encode("\n1812")
    (ids, start, end), = tokenize_sequences(tok, [("Capital? A: ", "Paris")], "language_modeling")
    assert ids[start:end] == [tok.vocab[" Paris"]]


def test_cropped_example_still_scores_with_a_short_model(tasks):
    entry, _, data = tasks[0]  # 3-shot multiple choice: prompts are much longer than 60 chars
    meta = dict(task_type="multiple_choice", num_fewshot=3, continuation_delimiter=" ")
    model = AnswerKeyModel(answer_key(tasks), max_seq_len=60)
    assert all(evaluate_example(i, model, CharTokenizer(), data, "cpu", meta) for i in range(len(data)))
    assert model.max_T_seen == 60


def test_our_gpt_reads_whole_examples_past_its_sequence_len_as_upstreams_does(tasks):
    """Upstream crops only models that declare max_seq_len; its GPT reads up to its rotary table
    (10x sequence_len), so a few-shot prompt longer than sequence_len is scored whole, BOS first."""
    _, _, data = tasks[0]
    meta = dict(task_type="multiple_choice", num_fewshot=3, continuation_delimiter=" ")
    model, seen = tiny_gpt(sequence_len=32), []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    evaluate_example(0, model, CharTokenizer(), data, "cpu", meta)
    assert seen[0].size(1) > 32 and (seen[0][:, 0] == BOS).all()
    assert core_eval.model_max_seq_len(model) == 320  # the rotary table: longer examples are cropped to it


# -----------------------------------------------------------------------------
# Scoring

def test_centered_formula():
    assert centered_accuracy(0.25, 25.0) == pytest.approx(0.0)
    assert centered_accuracy(1.0, 25.0) == pytest.approx(1.0)
    assert centered_accuracy(0.625, 25.0) == pytest.approx(0.5)
    assert centered_accuracy(0.3, 0.0) == pytest.approx(0.3)
    assert centered_accuracy(0.0, 50.0) == pytest.approx(-1.0)


def test_gold_answer_key_scores_one(tasks, bundle_dir):
    out = evaluate_core(AnswerKeyModel(answer_key(tasks)), CharTokenizer(), "cpu", bundle_dir)
    assert out["results"] == {e["label"]: 1.0 for e, _, _ in tasks}
    assert out["centered_results"] == pytest.approx({e["label"]: 1.0 for e, _, _ in tasks})
    assert out["core_metric"] == pytest.approx(1.0)


def test_wrong_answer_key_scores_zero(tasks, bundle_dir):
    out = evaluate_core(AnswerKeyModel(answer_key(tasks, wrong=True)), CharTokenizer(), "cpu", bundle_dir)
    assert out["results"] == {e["label"]: 0.0 for e, _, _ in tasks}
    centered = {e["label"]: -0.01 * b / (1 - 0.01 * b) for e, b, _ in tasks}
    assert out["centered_results"] == pytest.approx(centered)
    assert out["core_metric"] == pytest.approx(sum(centered.values()) / len(centered))


def test_uninformed_model_gets_no_lm_credit(tasks, bundle_dir):
    out = evaluate_core(AnswerKeyModel({}), CharTokenizer(), "cpu", bundle_dir)
    assert out["results"]["lm_words"] == 0.0 and out["results"]["lm_reverse"] == 0.0


def test_partial_key_and_max_per_task(tasks, bundle_dir):
    entry, _, data = tasks[0]
    meta = dict(task_type="multiple_choice", num_fewshot=3, continuation_delimiter=" ")
    model = AnswerKeyModel(answer_key(tasks, wrong=True, only=lambda i: i % 4 == 0))
    assert evaluate_task(model, CharTokenizer(), data, "cpu", meta) == pytest.approx(6 / 8)
    out = evaluate_core(AnswerKeyModel(answer_key(tasks)), CharTokenizer(), "cpu", bundle_dir, max_per_task=3)
    assert out["core_metric"] == pytest.approx(1.0)


def test_choice_scored_by_mean_not_total_loss():
    """Past the shared "ab", the short choice has the lower total loss (one miss in 1 token)
    but the long one the lower mean (two misses in 9 tokens): the mean must decide."""
    model = AnswerKeyModel({"Q: ": "abXXXXXXXXX"})
    example = dict(query="Q:", choices=["abc", "abXXXXXXXZW"], gold=1)
    meta = dict(task_type="multiple_choice", num_fewshot=0, continuation_delimiter=" ")
    assert evaluate_example(0, model, CharTokenizer(), [example], "cpu", meta)
    example["gold"] = 0
    assert not evaluate_example(0, model, CharTokenizer(), [example], "cpu", meta)


def context_span_argmin(model, pairs):
    """Argmin of mean loss when every token after the context is scored (not upstream's rule)."""
    tok = CharTokenizer()
    seqs = [(ids, len(tok.encode(c, prepend=BOS)), len(ids)) for c, k in pairs
            for ids in [tok.encode(c + k, prepend=BOS)]]
    loss, _ = core_eval.forward_sequences(model, seqs, BOS, "cpu")
    return loss.argmin().item()


def test_mc_shared_leading_tokens_do_not_decide():
    """The key reads "the sXn": scoring the shared "the " (nearly free for both) would dilute
    choice 0's single miss more than choice 1's misses and pick "the sun"; scoring only
    "sun" vs "moonlight" picks "the moonlight"."""
    model = AnswerKeyModel({"A: ": "the sXn"})
    example = dict(query="Q: what shines? A:", choices=["the sun", "the moonlight"], gold=1)
    meta = dict(task_type="multiple_choice", num_fewshot=0, continuation_delimiter=" ")
    assert evaluate_example(0, model, CharTokenizer(), [example], "cpu", meta)
    pairs = [("Q: what shines? A: ", c) for c in example["choices"]]
    assert context_span_argmin(model, pairs) == 0  # the shared tokens would flip it


def test_schema_scores_only_the_common_suffix():
    """Option 1's key predicts the shared "stone" and misses once in "ran"; option 0's key
    predicts "ran" perfectly but only after its whole option. Over "ran" alone option 0 wins;
    over the common suffix "stone ran" its unpredicted "stone " costs more than the miss."""
    model = AnswerKeyModel({"Brightstone ": "ran", "Cold": "stone raX"})
    example = dict(context_options=["Brightstone", "Coldstone"], continuation="ran", gold=1)
    meta = dict(task_type="schema", num_fewshot=0, continuation_delimiter=" ")
    assert evaluate_example(0, model, CharTokenizer(), [example], "cpu", meta)
    pairs = [(o + " ", "ran") for o in example["context_options"]]
    assert context_span_argmin(model, pairs) == 0  # scoring only the continuation would flip it


def tiny_gpt(sequence_len=128):
    from nanochat.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=sequence_len, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    return model.eval()


def test_padding_does_not_change_scores():
    """Choices of very different lengths share one padded batch; each row's loss and greedy
    flag must equal those of the sequence run alone."""
    model = tiny_gpt()
    pairs = [("Pick it\nAnswer: ", "a"), ("Pick it\nAnswer: ", "a much longer choice"), ("Pick", " it")]
    seqs = tokenize_sequences(CharTokenizer(), pairs, "language_modeling")
    loss, greedy = core_eval.forward_sequences(model, seqs, BOS, "cpu")
    for i, s in enumerate(seqs):
        loss_i, greedy_i = core_eval.forward_sequences(model, [s], BOS, "cpu")
        assert torch.allclose(loss[i], loss_i[0], atol=1e-5) and greedy[i] == greedy_i[0]
    assert loss.std() > 0  # the rows really differ


def _ddp_worker(rank, world_size, port, tasks, out_dir):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        _, _, data = tasks[0]
        meta = dict(task_type="multiple_choice", num_fewshot=3, continuation_delimiter=" ")
        model = AnswerKeyModel(answer_key(tasks, wrong=True, only=lambda i: i % 4 == 0))
        acc = evaluate_task(model, CharTokenizer(), data, "cpu", meta)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(acc, f)
    finally:  # the ranks meet at a barrier first: a bare destroy let gloo's worker abort the rank at exit (SIGABRT)
        from nanochat.common import compute_cleanup
        compute_cleanup()


def test_ddp_ranks_split_examples_and_agree(tasks, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, tasks, str(tmp_path)), nprocs=2, join=True)
    accs = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    # rank 0 alone sees examples 0,2,4,6 (two wrong), rank 1 sees 1,3,5,7 (none wrong)
    assert accs == pytest.approx([6 / 8, 6 / 8])


# -----------------------------------------------------------------------------
# A real (tiny, untrained) GPT runs end to end

@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_tiny_gpt_end_to_end(bundle_dir, device):
    model = tiny_gpt(sequence_len=96).to(device)  # shorter than the few-shot prompts: read whole, past sequence_len
    out = evaluate_core(model, CharTokenizer(), device, bundle_dir, max_per_task=4)
    assert set(out["results"]) == {"mc_four", "mc_three", "schema_two", "schema_three", "lm_words", "lm_reverse"}
    assert all(0.0 <= a <= 1.0 for a in out["results"].values())
    assert out["core_metric"] == pytest.approx(sum(out["centered_results"].values()) / 6)
