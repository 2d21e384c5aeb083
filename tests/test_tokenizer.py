"""Tests for nanochat/tokenizer.py and scripts/tok_train.py: a tiny tokenizer trained in-process."""

import io
import os
import re
import sys
import pickle
import copyreg
import subprocess

import pytest
import torch
import tiktoken

from conftest import each_flipped, save_without_digest
from nanochat.common import UserError, atomic_torch_save
from nanochat.tokenizer import (RustBPETokenizer, SPECIAL_TOKENS, SPLIT_PATTERN, compute_token_bytes,
                                get_tokenizer, get_token_bytes)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB_SIZE = 400


def make_corpus(n_docs=200):
    """Deterministic, varied text: words, numbers, punctuation, code and some non-ASCII."""
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "away", "from", "home",
             "tokenizer", "learns", "merges", "over", "bytes", "quickly", "river", "night", "bus"]
    docs = []
    for i in range(n_docs):
        sentence = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12))
        docs.append(f"{sentence.capitalize()}. Number {i * 37 % 1000} is here!\n"
                    f"def f_{i % 5}(x):\n    return x + {i % 9}\n"
                    f"Café über naïve — 東京 {i % 3}.")
    return docs


@pytest.fixture(scope="module")
def tok():
    return RustBPETokenizer.train_from_iterator(iter(make_corpus()), VOCAB_SIZE)


def sid(tok, name):
    return tok.encode_special(name)

# -----------------------------------------------------------------------------
# vocabulary and encoding

def test_special_tokens_take_last_ids_in_order(tok):
    assert tok.get_vocab_size() == VOCAB_SIZE
    assert [tok.encode_special(t) for t in SPECIAL_TOKENS] == list(range(VOCAB_SIZE - 9, VOCAB_SIZE))
    assert tok.get_special_tokens() == set(SPECIAL_TOKENS)
    assert tok.get_bos_token_id() == VOCAB_SIZE - 9
    assert tok.id_to_token(VOCAB_SIZE - 1) == "<|output_end|>"
    assert tok.enc.name == "rustbpe" and tok.enc._pat_str == SPLIT_PATTERN


def test_training_learned_merges(tok):
    ids = tok.encode("the cat sat on a mat")
    assert len(ids) < len("the cat sat on a mat")  # merged tokens, not one token per byte
    assert max(ids) < VOCAB_SIZE - 9


def test_too_small_vocab_is_refused():
    with pytest.raises(UserError, match="at least 265"):
        RustBPETokenizer.train_from_iterator(iter(["hello"]), 264)


@pytest.mark.parametrize("text", ["", "hello world", "Café 東京 🚀\n\n  tabs\tand 12345", "<|bos|> is plain text here"])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_special_token_text_is_not_special(tok):
    ids = tok.encode("<|bos|>")
    assert tok.get_bos_token_id() not in ids and len(ids) > 1


def test_numbers_split_in_runs_of_two_digits(tok):
    pieces = [tok.id_to_token(i) for i in tok.encode("12345")]
    assert "".join(pieces) == "12345"
    assert all(len(p) <= 2 for p in pieces)


def test_prepend_append(tok):
    plain = tok.encode("the cat")
    bos, end = sid(tok, "<|bos|>"), sid(tok, "<|assistant_end|>")
    assert tok.encode("the cat", prepend="<|bos|>") == [bos] + plain
    assert tok.encode("the cat", append="<|assistant_end|>") == plain + [end]
    assert tok.encode("the cat", prepend=bos, append=end) == [bos] + plain + [end]
    with pytest.raises(TypeError):
        tok.encode("the cat", prepend=1.5)


def test_batch_encode(tok):
    texts = ["the cat", "", "dog ran far 42"]
    rows = tok.encode(texts, prepend="<|bos|>", num_threads=2)
    bos = tok.get_bos_token_id()
    assert rows == [[bos] + tok.encode(t) for t in texts]
    assert tok.encode([]) == []
    with pytest.raises(TypeError):
        tok.encode(("a", "b"))

# -----------------------------------------------------------------------------
# conversation rendering

CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": [
        {"type": "text", "text": "Let me compute."},
        {"type": "python", "text": "2+3"},
        {"type": "python_output", "text": "5"},
        {"type": "text", "text": " It is 5."},
    ]},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome."},
]}


def test_render_conversation_ids_and_mask(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    e = tok.encode
    s = lambda name: [sid(tok, name)]
    expected = [  # (token ids, mask) segments
        (s("<|bos|>"), 0),
        (s("<|user_start|>"), 0), (e("Be brief.\n\nWhat is 2+3?"), 0), (s("<|user_end|>"), 0),  # system merged in
        (s("<|assistant_start|>"), 0),
        (e("Let me compute."), 1),
        (s("<|python_start|>"), 1), (e("2+3"), 1), (s("<|python_end|>"), 1),
        (s("<|output_start|>"), 0), (e("5"), 0), (s("<|output_end|>"), 0),
        (e(" It is 5."), 1),
        (s("<|assistant_end|>"), 1),
        (s("<|user_start|>"), 0), (e("Thanks"), 0), (s("<|user_end|>"), 0),
        (s("<|assistant_start|>"), 0), (e("You're welcome."), 1), (s("<|assistant_end|>"), 1),
    ]
    assert ids == [i for seg, _ in expected for i in seg]
    assert mask == [m for seg, m in expected for _ in seg]
    assert CONVERSATION["messages"][0]["role"] == "system"  # the input was not modified


def test_render_conversation_mask_by_token_kind(tok):
    ids, mask = tok.render_conversation(CONVERSATION)
    masked = {tok.id_to_token(i) for i, m in zip(ids, mask) if m == 1 and i >= VOCAB_SIZE - 9}
    unmasked = {tok.id_to_token(i) for i, m in zip(ids, mask) if m == 0 and i >= VOCAB_SIZE - 9}
    assert masked == {"<|python_start|>", "<|python_end|>", "<|assistant_end|>"}
    assert unmasked == {"<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                        "<|output_start|>", "<|output_end|>"}


def test_render_conversation_without_system(tok):
    conv = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ids, mask = tok.render_conversation(conv)
    bos, us, ue, as_, ae = (sid(tok, n) for n in ["<|bos|>", "<|user_start|>", "<|user_end|>",
                                                  "<|assistant_start|>", "<|assistant_end|>"])
    assert ids == [bos, us] + tok.encode("hi") + [ue, as_] + tok.encode("yo") + [ae]
    assert mask == [0, 0] + [0] * len(tok.encode("hi")) + [0, 0] + [1] * len(tok.encode("yo")) + [1]


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "assistant", "content": "a"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}],
    [{"role": "system", "content": "s"}, {"role": "assistant", "content": "b"}],
])
def test_roles_must_alternate(tok, messages):
    with pytest.raises(ValueError):
        tok.render_conversation({"messages": messages})


def test_bad_content_is_refused(tok):
    with pytest.raises(ValueError, match="part type"):
        tok.render_conversation({"messages": [{"role": "user", "content": "a"},
                                              {"role": "assistant", "content": [{"type": "image", "text": "x"}]}]})
    with pytest.raises(ValueError, match="no messages"):
        tok.render_conversation({"messages": []})


def test_truncation(tok):
    full_ids, full_mask = tok.render_conversation(CONVERSATION)
    assert len(full_ids) > 12
    ids, mask = tok.render_conversation(CONVERSATION, max_tokens=12)
    assert ids == full_ids[:12] and mask == full_mask[:12]


def test_render_for_completion(tok):
    prompt = tok.render_for_completion(CONVERSATION)
    without_last = {"messages": CONVERSATION["messages"][:-1]}
    ids, _ = tok.render_conversation(without_last)
    assert prompt == ids + [sid(tok, "<|assistant_start|>")]
    assert len(CONVERSATION["messages"]) == 5  # input untouched
    with pytest.raises(ValueError):
        tok.render_for_completion(without_last)  # ends with a user message

# -----------------------------------------------------------------------------
# token bytes

def test_compute_token_bytes(tok):
    token_bytes = compute_token_bytes(tok)
    assert token_bytes.dtype == torch.int32 and token_bytes.shape == (VOCAB_SIZE,)
    assert token_bytes[:256].tolist() == [1] * 256  # the byte tokens
    assert token_bytes[VOCAB_SIZE - 9:].tolist() == [0] * 9  # specials
    assert (token_bytes[256:VOCAB_SIZE - 9] >= 2).all()  # merges are at least 2 bytes
    text = "Café über naïve — 東京 🚀 the cat sat"
    assert int(token_bytes[tok.encode(text)].sum()) == len(text.encode("utf-8"))

# -----------------------------------------------------------------------------
# save / load

def test_save_load_round_trip(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tok.save(str(tmp_path / "tokenizer"))
    assert sorted(os.listdir(tmp_path / "tokenizer")) == ["tokenizer.pkl", "tokenizer.pkl.sha256"]  # no temp files left behind
    text = "the cat sat on a mat 12345 Café"
    for loaded in (RustBPETokenizer.from_directory(str(tmp_path / "tokenizer")), get_tokenizer()):
        assert loaded.get_vocab_size() == VOCAB_SIZE
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.render_conversation(CONVERSATION) == tok.render_conversation(CONVERSATION)
    # the file is a plain pickled tiktoken.Encoding, as upstream nanochat reads and writes it
    with open(tmp_path / "tokenizer" / "tokenizer.pkl", "rb") as f:
        enc = pickle.load(f)
    assert isinstance(enc, tiktoken.Encoding) and enc.encode_ordinary(text) == tok.encode(text)


def test_a_flipped_byte_in_a_saved_tokenizer_is_refused_by_its_digest(tok, tmp_path):
    """A flip inside a token's bytes still unpickles to a valid Encoding (other merges): only the
    digest beside the file can tell. Without one (upstream's directories), it loads as before."""
    import random
    path = tmp_path / "tokenizer.pkl"
    tok.save(str(tmp_path))
    random.seed(0)
    for _ in each_flipped(path, random.sample(range(path.stat().st_size), 25)):
        with pytest.raises(UserError, match="tokenizer .*tokenizer.pkl does not match its checksum") as e:
            RustBPETokenizer.from_directory(str(tmp_path))
        assert "\n" not in str(e.value)
    os.remove(str(path) + ".sha256")
    assert RustBPETokenizer.from_directory(str(tmp_path)).encode("the cat") == tok.encode("the cat")


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_loads_plain_pickles(tok, tmp_path, protocol):
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(tok.enc, protocol=protocol))
    assert RustBPETokenizer.from_directory(str(tmp_path)).encode("dog ran") == tok.encode("dog ran")


def test_get_token_bytes(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError, match="token_bytes.pt"):
        get_token_bytes()
    path = tmp_path / "tokenizer" / "token_bytes.pt"
    atomic_torch_save(compute_token_bytes(tok), str(path))
    assert torch.equal(get_token_bytes(), compute_token_bytes(tok))
    for bad, message in [(torch.zeros(3, 4, dtype=torch.int32), "1-D integer tensor"), (torch.ones(5), "1-D integer tensor"),
                         ({"a": 1}, "1-D integer tensor"), (torch.tensor([1, -3, 2]), "must be in 0..256")]:
        save_without_digest(bad, path)
        with pytest.raises(UserError, match=message):
            get_token_bytes()
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(UserError, match="cannot read token_bytes file .*token_bytes.pt") as e:
        get_token_bytes()
    assert "\n" not in str(e.value)
    # checked against the tokenizer: ours and upstream's count pass, another tokenizer's table does not
    for good in (compute_token_bytes(tok), compute_token_bytes(tok, as_upstream=True)):
        atomic_torch_save(good, str(path))
        assert torch.equal(get_token_bytes(tokenizer=tok), good)
    table = compute_token_bytes(tok)
    for bad, message in [(table[:-5], "entries but the tokenizer has"), (table.roll(1), "another tokenizer")]:
        atomic_torch_save(bad, str(path))
        with pytest.raises(UserError, match=message):
            get_token_bytes(tokenizer=tok)


def test_missing_directory(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no tokenizer"):
        RustBPETokenizer.from_directory(str(tmp_path / "nope"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(UserError, match="tok_train"):
        get_tokenizer()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(UserError, match="not allowed"):
        RustBPETokenizer.from_directory(str(tmp_path))
    assert not marker.exists()


def _pickle_encoding_state(state):
    """A pickle that builds tiktoken.core.Encoding with an arbitrary state (what a bad file could hold)."""
    buffer = io.BytesIO()
    pickler = pickle.Pickler(buffer, protocol=4)
    pickler.dispatch_table = {tiktoken.Encoding: lambda enc: (copyreg.__newobj__, (tiktoken.Encoding,), state)}
    pickler.dump(tiktoken.Encoding("x", pat_str=r"\s+", mergeable_ranks={b"a": 0}, special_tokens={}))
    return buffer.getvalue()  # NEWOBJ + BUILD(state), like the real thing


def test_registered_name_state_is_refused(tmp_path):
    # a pickled *registered* encoding is just its name, which tiktoken would download: refuse it
    (tmp_path / "tokenizer.pkl").write_bytes(_pickle_encoding_state("gpt2"))
    with pytest.raises(UserError, match="expected a dict"):
        RustBPETokenizer.from_directory(str(tmp_path))


@pytest.mark.parametrize("state, message", [
    ({"name": "x", "pat_str": r"\s+", "mergeable_ranks": {"a": 0}, "special_tokens": {}}, "bytes to int"),
    ({"name": "x", "pat_str": r"\s+", "mergeable_ranks": {}, "special_tokens": {}, "evil": 1}, "keys"),
])
def test_bad_encoding_state_is_refused(tmp_path, state, message):
    (tmp_path / "tokenizer.pkl").write_bytes(_pickle_encoding_state(state))
    with pytest.raises(UserError, match=message):
        RustBPETokenizer.from_directory(str(tmp_path))


def test_other_objects_are_refused(tmp_path):
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps({"name": "rustbpe"}))
    with pytest.raises(UserError, match="not a tiktoken.Encoding"):
        RustBPETokenizer.from_directory(str(tmp_path))


def test_encoding_without_specials_is_refused(tok, tmp_path):
    enc = tiktoken.Encoding(name="rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=tok.enc._mergeable_ranks,
                            special_tokens={})
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(enc))
    with pytest.raises(UserError, match="special tokens"):
        RustBPETokenizer.from_directory(str(tmp_path))


def test_a_pickle_whose_ids_are_damaged_is_refused_in_one_line(tok, tmp_path, monkeypatch):
    """Without a digest beside it (upstream's layout) a changed byte could leave two tokens on one id: tiktoken
    then panicked (a Rust traceback), or the file loaded with an id lost and training died at its first save
    (fingerprint: KeyError) after all its steps."""
    import tiktoken
    state = tok.enc.__getstate__()
    ranks, specials = state["mergeable_ranks"], state["special_tokens"]
    token = next(t for t, i in ranks.items() if len(t) > 1)
    other = next(t for t, i in ranks.items() if len(t) > 1 and t != token)
    n = len(ranks)
    cases = [({**ranks, token: ranks[other]}, specials, f"id {ranks[token]} is missing"),      # two tokens, one id
             ({t: i for t, i in ranks.items() if t != token} | {b"zz" * 9: ranks[token]}, specials, None),  # renamed: fine
             ({t: (i if t != token else n + 100) for t, i in ranks.items()}, specials, f"id {ranks[token]} is missing"),
             ({t: i for t, i in ranks.items() if t != b"q"} | {b"qq" * 9: ranks[b"q"]}, specials, "lacks the byte b'q'"),
             (ranks, {**specials, "<|bos|>": 2 ** 31}, "special token ids must be")]
    for new_ranks, new_specials, message in cases:
        with monkeypatch.context() as m:
            m.setattr(tiktoken.core.Encoding, "__getstate__", lambda self: {**state, "mergeable_ranks": new_ranks, "special_tokens": new_specials})
            (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(tok.enc))
        if message is None:
            assert RustBPETokenizer.from_directory(str(tmp_path)).get_vocab_size() == tok.get_vocab_size()
            continue
        with pytest.raises(UserError, match="not a valid tokenizer pickle .*" + re.escape(message)) as e:
            RustBPETokenizer.from_directory(str(tmp_path))
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("cut", [0, 1, 50, -1])
def test_truncated_pickle_is_refused(tok, tmp_path, cut):
    data = pickle.dumps(tok.enc)
    data = data[:cut] if cut >= 0 else data[:len(data) // 2]
    (tmp_path / "tokenizer.pkl").write_bytes(data)
    with pytest.raises(UserError, match="not a valid tokenizer pickle"):
        RustBPETokenizer.from_directory(str(tmp_path))

# -----------------------------------------------------------------------------
# scripts/tok_train.py end to end

def run_script(module, args, base_dir):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_DATASET="climbmix")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_tok_train_rejects_small_vocab(tmp_path):
    result = run_script("scripts.tok_train", ["--vocab-size", "100"], tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: --vocab-size must be 265")
    result = run_script("scripts.tok_train", ["--vocab-size", "99999999999"], tmp_path)  # was an OverflowError traceback
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1 and "--vocab-size" in result.stderr


def test_tok_train_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("nanochat.dataset")
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    data_dir = tmp_path / "base_data_climbmix"
    data_dir.mkdir()
    docs = make_corpus(400)
    pq.write_table(pa.table({"text": docs[:300]}), str(data_dir / "shard_00000.parquet"), row_group_size=64)
    pq.write_table(pa.table({"text": docs[300:]}), str(data_dir / "shard_00001.parquet"), row_group_size=64)

    result = run_script("scripts.tok_train", ["--vocab-size", "300", "--max-chars", "20000", "--doc-cap", "500"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "trained on" in result.stdout

    tok_dir = tmp_path / "tokenizer"
    tok = RustBPETokenizer.from_directory(str(tok_dir))
    assert tok.get_vocab_size() == 300
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat"
    token_bytes = torch.load(str(tok_dir / "token_bytes.pt"), weights_only=True)
    assert torch.equal(token_bytes, compute_token_bytes(tok))

    result = run_script("scripts.tok_eval", ["--no-compare"], tmp_path)  # --no-compare: no tiktoken download
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()}
    assert "ours" in rows["text"] and "gpt2" not in rows["text"]
    assert {"news", "code", "train-shard", "val-shard"} <= set(rows)

    # a second training refuses to replace it (checkpoints name the tokenizer they were trained with) unless --overwrite
    before = (tok_dir / "tokenizer.pkl").read_bytes()
    again = ["--vocab-size", "280", "--max-chars", "20000", "--doc-cap", "500"]
    result = run_script("scripts.tok_train", again, tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "--overwrite replaces it" in lines[0], result.stderr
    assert (tok_dir / "tokenizer.pkl").read_bytes() == before
    result = run_script("scripts.tok_train", again + ["--overwrite"], tmp_path)
    assert result.returncode == 0 and RustBPETokenizer.from_directory(str(tok_dir)).get_vocab_size() == 280
    # stopped between its two saves (Ctrl-C): the old token_bytes.pt stayed beside the new tokenizer, its byte
    # counts wrong for 139 of 512 ids in a reviewer's run, and every bpb figure after it silently wrong
    from scripts import tok_train

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_DATASET", "climbmix")
    monkeypatch.setattr(sys, "argv", ["tok_train"] + again[:1] + ["290"] + again[2:] + ["--overwrite"])
    monkeypatch.setattr(tok_train, "atomic_torch_save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tok_train.main()
    assert RustBPETokenizer.from_directory(str(tok_dir)).get_vocab_size() == 290 and not (tok_dir / "token_bytes.pt").exists()


def test_parse_assistant_inverts_the_rendering(tok):
    """A reply with a calculator call, parsed back into parts, re-renders to the same tokens."""
    s = lambda name: sid(tok, name)
    reply = (tok.encode("so ") + [s("<|python_start|>")] + tok.encode("12*3") + [s("<|python_end|>")]
             + [s("<|output_start|>")] + tok.encode("36") + [s("<|output_end|>")] + tok.encode(" done"))
    content = tok.parse_assistant(reply)
    assert content == [{"type": "text", "text": "so "}, {"type": "python", "text": "12*3"},
                       {"type": "python_output", "text": "36"}, {"type": "text", "text": " done"}]
    user = {"role": "user", "content": "what is 12*3?"}
    ids, _ = tok.render_conversation({"messages": [user, {"role": "assistant", "content": content}]})
    prompt = tok.render_for_completion({"messages": [user, {"role": "assistant", "content": ""}]})
    assert ids == prompt + reply + [s("<|assistant_end|>")]
    assert tok.parse_assistant(tok.encode("plain words")) == "plain words"  # no tool: a plain string
    cut = tok.parse_assistant(tok.encode("x") + [s("<|python_start|>")] + tok.encode("1+"))  # cut off mid-call
    assert cut == [{"type": "text", "text": "x"}, {"type": "python", "text": "1+"}]


def test_a_token_bytes_pickle_that_runs_code_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    marker = tmp_path / "pwned"
    (tmp_path / "tokenizer").mkdir()
    with open(tmp_path / "tokenizer" / "token_bytes.pt", "wb") as f:
        pickle.dump(_Evil(str(marker)), f)
    with pytest.raises(UserError, match="cannot read token_bytes file .*: UnpicklingError") as e:
        get_token_bytes()
    assert "\n" not in str(e.value) and len(str(e.value)) < 400 and not marker.exists()
