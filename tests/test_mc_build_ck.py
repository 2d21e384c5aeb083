"""scripts/mc_build_ck.py: a directory of text -> a Core-Knowledge MegaContext tree on disk."""

import json
import os

import pytest
import torch

from conftest import save_mc_checkpoint
from nanochat.common import UserError


def write_corpus(root, texts):
    for rel, text in texts.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_build_a_ck_tree_with_a_manifest(base_dir, tmp_path):
    from scripts import mc_build_ck
    from nanochat.checkpoint_manager import load_model
    from nanochat.megacontext.checkpoint import load_for_chat
    from nanochat.megacontext.gistnet import AnyLevel
    from nanochat.megacontext.tree import MegaContextTree
    save_mc_checkpoint(base_dir, "ck_model")
    corpus = tmp_path / "corpus"
    facts = {f"people/p{i:02d}.txt": f"Person {i} lives in city number {i * 7}. " * 30 for i in range(40)}
    write_corpus(corpus, {**facts, "notes.md": "a short note", "skip.bin": "not read", "z/readme.txt": "the end"})
    out = tmp_path / "ck"
    manifest = mc_build_ck.main(["--input", str(corpus), "--out", str(out), "-i", "base", "-g", "ck_model", "--device-type", "cpu"])

    assert not os.path.exists(str(out) + ".partial")
    data = json.loads((out / "ck.json").read_text())
    assert data == manifest and data["model"] == "base/ck_model step 5" and data["step"] == 5
    paths = [f["path"] for f in data["files"]]
    assert paths == sorted(paths) and "skip.bin" not in paths and len(paths) == 42
    assert data["files"][0]["start"] == 0 and all(a["end"] == b["start"] for a, b in zip(data["files"], data["files"][1:]))
    end = data["files"][-1]["end"]
    assert data["tokens"] == end + (-end % 32) > 32 ** 2  # <|bos|> fills the last block; LOD2 is past the trained depth (AnyLevel)
    assert len(data["levels"]) >= 3 and data["levels"][2] == data["tokens"] // 32 ** 2

    model, tokenizer, _ = load_model("base", "cpu", phase="eval", model_tag="ck_model")
    _, gistnet, _, _ = load_for_chat("base", "ck_model", 5, model, "cpu")
    tree = MegaContextTree.load(str(out), AnyLevel(gistnet), model.embed_tokens, in_ram=True, model_name="base/ck_model step 5")
    first = data["files"][0]
    ids = tokenizer.encode((corpus / first["path"]).read_text(), prepend=tokenizer.get_bos_token_id())
    assert tree.tokens(first["start"], first["end"]).tolist() == ids  # each file: <|bos|> + its text
    assert set(tree.tokens(end, data["tokens"]).tolist()) <= {tokenizer.get_bos_token_id()}
    with torch.no_grad():
        block = model.embed_tokens(tree.tokens(0, 32))[None].float()
        assert torch.allclose(tree.gist(1, 0), gistnet(block, 1)[0].half().float(), atol=1e-3)
    with pytest.raises(UserError, match="built for model"):
        MegaContextTree.load(str(out), AnyLevel(gistnet), model.embed_tokens, in_ram=True, model_name="sft/other")


def test_bad_input_is_a_one_line_error(base_dir, tmp_path):
    from scripts import mc_build_ck
    save_mc_checkpoint(base_dir, "ck_model")
    flags = ["-i", "base", "-g", "ck_model", "--device-type", "cpu"]
    with pytest.raises(UserError, match="no such directory"):
        mc_build_ck.main(["--input", str(tmp_path / "missing"), "--out", str(tmp_path / "ck")] + flags)
    write_corpus(tmp_path / "empty", {"a.bin": "x"})
    with pytest.raises(UserError, match="no file with extension"):
        mc_build_ck.main(["--input", str(tmp_path / "empty"), "--out", str(tmp_path / "ck")] + flags)
    write_corpus(tmp_path / "docs", {"a.txt": "hello"})
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="already exists"):
        mc_build_ck.main(["--input", str(tmp_path / "docs"), "--out", str(tmp_path / "taken")] + flags)
    (tmp_path / "docs" / "b.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(UserError, match="not UTF-8") as e:
        mc_build_ck.main(["--input", str(tmp_path / "docs"), "--out", str(tmp_path / "ck")] + flags)
    assert "\n" not in str(e.value) and not (tmp_path / "ck").exists()  # nothing half-built at --out
    (tmp_path / "docs" / "b.txt").write_text("fine now")
    os.symlink(tmp_path / "nowhere.txt", tmp_path / "docs" / "c.txt")  # a dangling link: refused before the model loads
    with pytest.raises(UserError, match="c.txt: not a readable file"):
        mc_build_ck.main(["--input", str(tmp_path / "docs"), "--out", str(tmp_path / "ck")] + flags)
    os.remove(tmp_path / "docs" / "c.txt")
    import fcntl  # a build still writing the .partial holds its lock: a second build must not remove it under it
    fd = os.open(str(tmp_path / "ck") + ".partial", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: the failed build above released it
    with pytest.raises(UserError, match="another mc_build_ck is writing it"):
        mc_build_ck.main(["--input", str(tmp_path / "docs"), "--out", str(tmp_path / "ck")] + flags)
    assert os.path.isdir(str(tmp_path / "ck") + ".partial")
    os.close(fd)
    mc_build_ck.main(["--input", str(tmp_path / "docs"), "--out", str(tmp_path / "ck")] + flags)  # the stale .partial is redone
    assert json.loads((tmp_path / "ck" / "ck.json").read_text())["files"][1]["path"] == "b.txt"
