"""chat_cli with --megacontext / --gist-first: a conversation through a runtime Session, /focus, saved sessions."""

import io
import os
import sys
import shutil

import numpy as np
import pytest

from conftest import save_mc_checkpoint
from nanochat.common import UserError

def run_cli(monkeypatch, capsys, args, stdin=""):
    from scripts import chat_cli
    monkeypatch.setattr(sys, "argv", ["chat_cli", "-i", "base", "-t", "0", "--device-type", "cpu", *args])
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    chat_cli.main()
    return capsys.readouterr().out


def test_megacontext_chat_focus_and_a_resumed_session(base_dir, tmp_path, monkeypatch, capsys):
    save_mc_checkpoint(base_dir, "mc_chat")
    out = run_cli(monkeypatch, capsys, ["-g", "mc_chat", "--megacontext", "-p", "hello there", "--max-tokens", "6"])
    assert out.strip()
    session = str(tmp_path / "session")
    long_turn = " ".join(["the cat sat on the mat"] * 40)  # past w_max (96 slots) and the model's 128-token context
    out = run_cli(monkeypatch, capsys, ["-g", "mc_chat", "--megacontext", "--session", session, "--max-tokens", "6"],
                  stdin=f"{long_turn}\n/focus\nhello\nquit\n")
    assert out.count("Assistant:") == 2 and "working context" in out and "LOD mix: LOD0" in out
    assert os.path.exists(os.path.join(session, "session.json"))
    before = int(out.split("history ")[1].split(" tokens")[0].replace(",", ""))
    assert before > 128
    out = run_cli(monkeypatch, capsys, ["-g", "mc_chat", "--megacontext", "--session", session, "--max-tokens", "6"],
                  stdin="again\n/focus\nquit\n")
    assert "resumed the session" in out
    after = int(out.split("history ")[-1].split(" tokens")[0].replace(",", ""))
    assert after > before + 3  # the previous turns are still there, the new one added


def test_a_resumed_session_that_never_had_a_turn_opens_its_history_with_bos(base_dir, tmp_path, monkeypatch, capsys):
    from nanochat.tokenizer import get_tokenizer
    from nanochat.megacontext.tree import HEADER_BYTES
    save_mc_checkpoint(base_dir, "mc_chat")
    session = str(tmp_path / "session")
    run_cli(monkeypatch, capsys, ["-g", "mc_chat", "--megacontext", "--session", session], stdin="quit\n")  # saved, empty
    run_cli(monkeypatch, capsys, ["-g", "mc_chat", "--megacontext", "--session", session, "-p", "hi", "--max-tokens", "2"])
    ids = np.fromfile(os.path.join(session, "lod0.bin"), dtype=np.uint32, offset=HEADER_BYTES)
    assert ids[0] == get_tokenizer().get_bos_token_id()  # it opened with <|user_start|>


def test_a_reply_that_stops_at_bos_closes_its_turn_in_the_history_as_the_chat_format_does(base_dir, tmp_path, monkeypatch, capsys):
    """A sampled <|bos|> ends the reply, as <|assistant_end|> does; the history then holds <|assistant_end|>
    there, as a re-rendered conversation would, not a <|bos|> opening a new document mid-conversation."""
    import torch
    from nanochat.tokenizer import get_tokenizer
    from nanochat.megacontext import runtime
    from nanochat.megacontext.tree import HEADER_BYTES
    tokenizer = get_tokenizer()
    bos, end = tokenizer.get_bos_token_id(), tokenizer.encode_special("<|assistant_end|>")
    save_mc_checkpoint(base_dir, "mc_chat")
    sample, calls = runtime.sample_next, []

    def third_is_bos(logits, *args):
        calls.append(1)
        return torch.full((1,), bos) if len(calls) == 3 else sample(logits, *args)
    monkeypatch.setattr(runtime, "sample_next", third_is_bos)
    session = str(tmp_path / "session")
    run_cli(monkeypatch, capsys, ["-g", "mc_chat", "--megacontext", "--session", session, "-p", "hi", "--max-tokens", "8"])
    ids = np.fromfile(os.path.join(session, "lod0.bin"), dtype=np.uint32, offset=HEADER_BYTES).tolist()
    prompt = tokenizer.render_for_completion({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]})
    assert ids[:len(prompt)] == prompt and len(ids) == len(prompt) + 3
    assert ids[-1] == end and ids.count(bos) == 1  # the reply's two tokens, then the turn closed


def test_context_file_is_read_into_the_history(base_dir, tmp_path, monkeypatch, capsys):
    save_mc_checkpoint(base_dir, "mc_ctx")
    doc = tmp_path / "book.txt"
    doc.write_text("Once upon a time there was a small model. " * 200)
    out = run_cli(monkeypatch, capsys, ["-g", "mc_ctx", "--megacontext", "--context-file", str(doc), "--max-tokens", "4"],
                  stdin="/focus\nquit\n")
    assert "into the history" in out and "tree levels 1..2" in out  # > 1024 tokens: LOD2 gists past the trained LOD1


def test_gist_first_needs_megaprediction_weights_and_runs_with_them(base_dir, monkeypatch, capsys):
    save_mc_checkpoint(base_dir, "mc_plain")
    with pytest.raises(UserError, match="gist-first decoding needs MegaPrediction"):
        run_cli(monkeypatch, capsys, ["-g", "mc_plain", "--gist-first", "-p", "hi"])
    save_mc_checkpoint(base_dir, "mc_mp", megaprediction=True)
    out = run_cli(monkeypatch, capsys, ["-g", "mc_mp", "--gist-first", "--max-tokens", "40"], stdin="hello\n/focus\nquit\n")
    assert "gist-first" in out and "MegaPrediction on" in out


def test_a_gist_first_session_resumes_gist_first_without_the_flag(base_dir, tmp_path, monkeypatch, capsys):
    save_mc_checkpoint(base_dir, "mc_mp", megaprediction=True)
    session = str(tmp_path / "session")
    out = run_cli(monkeypatch, capsys, ["-g", "mc_mp", "--gist-first", "--session", session, "--max-tokens", "4"],
                  stdin="hello\nquit\n")
    assert "gist-first" in out
    out = run_cli(monkeypatch, capsys, ["-g", "mc_mp", "--megacontext", "--session", session, "--max-tokens", "4"],
                  stdin="again\nquit\n")
    assert "resumed the session" in out and "gist-first" in out  # as it was saved


def test_megacontext_flags_without_megacontext_are_refused(base_dir, monkeypatch, capsys):
    save_mc_checkpoint(base_dir, "mc_flags")
    with pytest.raises(SystemExit):
        run_cli(monkeypatch, capsys, ["-g", "mc_flags", "--session", "x"])
    with pytest.raises(SystemExit):
        run_cli(monkeypatch, capsys, ["-g", "mc_flags", "--megacontext", "--context-file", "/no/such/file"])
    with pytest.raises(SystemExit):  # 0 was taken for "not given" and ignored
        run_cli(monkeypatch, capsys, ["-g", "mc_flags", "--w-max", "0"])
    assert "need --megacontext" in capsys.readouterr().err
    for prompt in ("", "  "):  # an empty $VAR: a one-line error, not a chat waiting on stdin
        with pytest.raises(SystemExit):
            run_cli(monkeypatch, capsys, ["-g", "mc_flags", "-p", prompt], stdin="hello\nquit\n")
        assert "-p/--prompt is empty" in capsys.readouterr().err


def build_ck(tmp_path, name, source="base", tag="mc_chat"):
    """A Core-Knowledge memory of a few text files, built for base/<tag> by scripts.mc_build_ck."""
    from scripts import mc_build_ck
    corpus = tmp_path / f"{name}_corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"f{i}.txt").write_text(f"fact {i}: the river number {i} flows north. " * 20)
    out = str(tmp_path / name)
    mc_build_ck.main(["--input", str(corpus), "--out", out, "-i", source, "-g", tag, "--device-type", "cpu"])
    return out


def test_a_refused_new_session_leaves_nothing_behind_and_a_context_file_is_saved_at_once(base_dir, tmp_path, monkeypatch, capsys):
    """A mistyped --w-max or --ck used to leave a tree without session.json (or an empty session
    without the memory): the same --session was then refused for good. A --context-file read into
    a new session was lost if the user left before the first reply."""
    save_mc_checkpoint(base_dir, "mc_chat")
    ck = build_ck(tmp_path, "rivers")
    session = tmp_path / "session"
    with pytest.raises(UserError, match="leaves no room"):
        run_cli(monkeypatch, capsys, ["-g", "mc_chat", "--megacontext", "--session", str(session), "--w-max", "40"], stdin="quit\n")
    assert not session.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own file")
    for folder in (session, mine):
        with pytest.raises(UserError, match="no such directory"):
            run_cli(monkeypatch, capsys, ["-g", "mc_chat", "--session", str(folder), "--ck", str(tmp_path / "rivrs")], stdin="quit\n")
    assert not session.exists() and sorted(os.listdir(mine)) == ["notes.txt"]  # only what the run wrote is removed
    out = run_cli(monkeypatch, capsys, ["-g", "mc_chat", "--session", str(session), "--ck", ck], stdin="quit\n")
    assert "attached the Core-Knowledge memory" in out
    doc = tmp_path / "book.txt"
    doc.write_text("Once upon a time there was a small model. " * 20)
    fresh = tmp_path / "fresh"
    run_cli(monkeypatch, capsys, ["-g", "mc_chat", "--megacontext", "--session", str(fresh), "--context-file", str(doc)], stdin="quit\n")
    out = run_cli(monkeypatch, capsys, ["-g", "mc_chat", "--megacontext", "--session", str(fresh)], stdin="quit\n")
    assert "resumed the session" in out and "0 tokens" not in out
    with pytest.raises(UserError, match="cannot make or open this directory"):  # a file on the way: one line
        run_cli(monkeypatch, capsys, ["-g", "mc_chat", "--megacontext", "--session", str(doc / "chat")], stdin="quit\n")


def test_core_knowledge_memories_attach_show_in_focus_and_resume(base_dir, tmp_path, monkeypatch, capsys):
    save_mc_checkpoint(base_dir, "mc_chat")
    ck = build_ck(tmp_path, "rivers")
    session = str(tmp_path / "session")
    out = run_cli(monkeypatch, capsys, ["-g", "mc_chat", "--ck", ck, "--session", session, "--max-tokens", "6"],
                  stdin="which river flows north?\n/focus\nquit\n")
    assert "attached the Core-Knowledge memory" in out and out.count("Assistant:") == 1
    assert "memory rivers:" in out and "memory session:" in out
    out = run_cli(monkeypatch, capsys, ["-g", "mc_chat", "--megacontext", "--session", session, "--max-tokens", "6"],
                  stdin="/focus\nquit\n")
    assert "resumed the session" in out and "memory rivers" in out  # the memory comes back with the session
    other = build_ck(tmp_path, "other")
    with pytest.raises(UserError, match="saved with Core-Knowledge memories"):
        run_cli(monkeypatch, capsys, ["-g", "mc_chat", "--session", session, "--ck", other], stdin="quit\n")
    listing = sorted(os.listdir(ck))  # a memory given as --session: said so (it told a CLI user to call MegaContextTree.load)
    with pytest.raises(UserError, match="holds a MegaContext tree that is not a chat session .* attach it with --ck"):
        run_cli(monkeypatch, capsys, ["-g", "mc_chat", "--megacontext", "--session", ck], stdin="quit\n")
    assert sorted(os.listdir(ck)) == listing


def test_a_memory_built_for_another_model_is_refused(base_dir, tmp_path, monkeypatch, capsys):
    save_mc_checkpoint(base_dir, "mc_chat")
    save_mc_checkpoint(base_dir, "mc_other")
    ck = build_ck(tmp_path, "theirs", tag="mc_other")
    with pytest.raises(UserError, match="built for model 'base/mc_other step 5', not 'base/mc_chat step 5'") as e:
        run_cli(monkeypatch, capsys, ["-g", "mc_chat", "--ck", ck, "-p", "hi"])
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="no such directory"):
        run_cli(monkeypatch, capsys, ["-g", "mc_chat", "--ck", str(tmp_path / "missing"), "-p", "hi"])


def test_a_memory_built_for_another_step_of_the_same_tag_is_refused(base_dir, tmp_path, monkeypatch, capsys):
    """Its gists are that step's GistNet's: a later step of the tag (an SFT continued) attached it silently."""
    save_mc_checkpoint(base_dir, "mc_step")
    ck = build_ck(tmp_path, "steps", tag="mc_step")
    directory = base_dir / "base_checkpoints" / "mc_step"
    for name in ("model_000005.pt", "meta_000005.json", "mc_000005.pt"):  # the same weights saved again as step 6
        shutil.copy(directory / name, directory / name.replace("5", "6"))
    with pytest.raises(UserError, match="built for model 'base/mc_step step 5', not 'base/mc_step step 6'"):
        run_cli(monkeypatch, capsys, ["-g", "mc_step", "--ck", ck, "-p", "hi", "--max-tokens", "2"])
    out = run_cli(monkeypatch, capsys, ["-g", "mc_step", "-s", "5", "--ck", ck, "-p", "hi", "--max-tokens", "2"])
    assert "attached the Core-Knowledge memory" in out


def test_a_plain_chat_past_the_models_reach_says_so_instead_of_answering_nothing(base_dir, monkeypatch, capsys):
    save_mc_checkpoint(base_dir, "plain_full")  # sequence_len 128: the rotary table reads 1,280 positions
    long = " ".join(["the cat sat on the mat"] * 300)
    with pytest.raises(UserError, match="reads at most 1,280.*--megacontext"):
        run_cli(monkeypatch, capsys, ["-g", "plain_full", "-p", long, "--max-tokens", "4"])
    out = run_cli(monkeypatch, capsys, ["-g", "plain_full", "--max-tokens", "4"], stdin=f"{long}\nhello\nquit\n")
    assert out.count("reads at most 1,280") == 1 and out.count("Assistant:") == 2  # the long turn was dropped, not kept


def test_bad_chat_inputs_are_one_line_errors(base_dir, tmp_path, monkeypatch, capsys):
    save_mc_checkpoint(base_dir, "mc_bad")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9 au lait\n")
    with pytest.raises(UserError, match="not UTF-8"):
        run_cli(monkeypatch, capsys, ["-g", "mc_bad", "--megacontext", "--context-file", str(latin), "-p", "hi"])
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for flags in (["--megacontext", "--session", str(a_file)], ["--max-tokens", "0"]):
        with pytest.raises(SystemExit):
            run_cli(monkeypatch, capsys, ["-g", "mc_bad", "-p", "hi", *flags])
    # a resumed session refuses the flags it would otherwise ignore
    session = str(tmp_path / "session")
    run_cli(monkeypatch, capsys, ["-g", "mc_bad", "--megacontext", "--session", session, "--max-tokens", "2", "-p", "hi"])
    with pytest.raises(UserError, match="saved with --w-max 96"):
        run_cli(monkeypatch, capsys, ["-g", "mc_bad", "--megacontext", "--session", session, "--w-max", "256", "-p", "hi"])
    with pytest.raises(UserError, match="--context-file reads a file into a new session"):
        run_cli(monkeypatch, capsys, ["-g", "mc_bad", "--megacontext", "--session", session, "--context-file", str(a_file), "-p", "hi"])
    out = run_cli(monkeypatch, capsys, ["-g", "mc_bad", "--megacontext", "--session", session, "--w-max", "96",
                                        "--max-tokens", "2", "-p", "again"])
    assert "resumed the session" in out
