"""
Build a Core-Knowledge MegaContext: a corpus read once into a disk tree (tokens + gists at every
level) that chats and evals then attach beside the session's own memory (chat_cli --ck PATH,
nanochat/megacontext/composite.py).

    python -m scripts.mc_build_ck --input docs/ --out ~/ck/docs --model-tag d12_mc
    python -m scripts.mc_build_ck --input notes/ --out /tmp/ck --ext txt,md,py -i base

Every file under --input with one of the --ext extensions, in sorted path order, becomes one
document: <|bos|> + its text; <|bos|> tokens after the last one fill its last block, so every token
of the memory has an LOD1 gist (a working context can hold all of it as gists). The gists are made with the GistNet of the model it will be used with
(the same --source / --model-tag as the chat: a tree holds that model's embeddings, and a tree built
for another model is refused on load). Out: the tree files (tree.py's disk layout) and ck.json:
    {"format": 1, "model": "<source>/<tag> step <step>", "step", "tokens", "levels": [rows per level],
     "files": [{"path": relative path, "start": first token, "end": token after the last}], "input"}
The build writes to <out>.partial and renames it to <out> when complete, so <out> is never half
written; an existing <out> is refused (remove it first), and a .partial left by a killed build is
started over.
"""

import os
import fcntl
import sys
import json
import time
import shutil
import argparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from nanochat.common import UserError, cli_main, compute_init, compute_cleanup, print0, atomic_write_json
from nanochat.megacontext.composite import CK_FILE, CK_FORMAT


def build_parser():
    p = argparse.ArgumentParser(description="Build a Core-Knowledge MegaContext tree from a directory of text", allow_abbrev=False)
    p.add_argument("--input", type=str, required=True, help="directory of text files (searched recursively)")
    p.add_argument("--out", type=str, required=True, help="directory to create for the tree")
    p.add_argument("--ext", type=str, default="txt,md", help="file extensions to read, comma-separated")
    p.add_argument("-i", "--source", type=str, default="sft", choices=["base", "sft", "rl"], help="the model the CK is for")
    p.add_argument("-g", "--model-tag", type=str, default=None)
    p.add_argument("-s", "--step", type=int, default=None)
    p.add_argument("--device-type", type=str, default="")
    return p


def corpus_files(root, extensions):
    """Sorted relative paths of the files under root whose extension is in extensions."""
    if not os.path.isdir(root):
        raise UserError(f"--input {root}: no such directory")
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        out += [os.path.relpath(os.path.join(d, f), root) for f in sorted(files)
                if os.path.splitext(f)[1].lstrip(".").lower() in extensions]
    if not out:
        raise UserError(f"--input {root}: no file with extension {', '.join(sorted(extensions))}")
    for rel in out:  # before the model loads: a dangling link or an unreadable file is refused now
        path = os.path.join(root, rel)
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise UserError(f"{path}: not a readable file (a dangling link? no permission?)")
    return sorted(out)


def read_texts(root, files):
    """Each file's text, or a one-line error for a file that is not UTF-8 or cannot be read."""
    for rel in files:
        path = os.path.join(root, rel)
        try:
            with open(path, encoding="utf-8") as f:
                yield f.read()
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text") from None
        except OSError as e:
            raise UserError(f"{path}: cannot read it ({e.strerror})") from None


def lock_dir(path):
    """An exclusive flock on directory `path`, the lock a MegaContextTree holds while it writes there:
    its fd (os.close releases it), or a one-line error while another build holds it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{path}: another mc_build_ck is writing it (wait for it to end, or choose another --out)") from None
    return fd


def main(argv=None):
    args = build_parser().parse_args(argv)
    extensions = {e.strip().lstrip(".").lower() for e in args.ext.split(",") if e.strip()}
    files = corpus_files(args.input, extensions)
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        raise UserError(f"--out {args.out} already exists: remove it or choose another directory")
    partial = out + ".partial"
    if os.path.exists(partial):  # left by a build that died, or written by one still running: never removed then
        fd = lock_dir(partial)
        print0(f"removing {partial}, left by a build that did not finish")
        shutil.rmtree(partial)
        os.close(fd)

    _, _, _, _, device = compute_init(args.device_type)
    try:
        from nanochat.checkpoint_manager import load_model, resolve_checkpoint
        from nanochat.megacontext.checkpoint import chat_model_name, load_for_chat
        from nanochat.megacontext.composite import ingest_documents
        from nanochat.megacontext.gistnet import AnyLevel
        from nanochat.megacontext.tree import MegaContextTree
        _, model_tag, step = resolve_checkpoint(args.source, args.model_tag, args.step)
        model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=model_tag, step=step)
        _, gistnet, _, _ = load_for_chat(args.source, model_tag, step, model, device)
        name = chat_model_name(args.source, model_tag, step)  # what chat_cli names its trees: the CK is checked against it on attach
        print0(f"building a Core-Knowledge MegaContext of {len(files)} files from {args.input} for {name}")
        tree = MegaContextTree(model.config.n_embd, AnyLevel(gistnet), model.embed_tokens, path=partial, model_name=name,
                               device=model.get_device())
        t0, last = time.time(), [0.0]

        def progress(k, tree):
            if time.time() - last[0] > 5 or k == len(files) - 1:
                last[0] = time.time()
                print0(f"{k + 1}/{len(files)} files | {tree.num_tokens:,} tokens | {tree.num_tokens / max(last[0] - t0, 1e-9):,.0f} tokens/s")

        try:
            with torch.inference_mode():
                spans = ingest_documents(tree, tokenizer, read_texts(args.input, files), progress)
        finally:
            tree.close()  # flushes (the tree is complete on disk) and releases the directory's lock, on failure too
        entries = [dict(path=rel, start=a, end=b) for rel, (a, b) in zip(files, spans)]
        levels = [tree.levels[L].n for L in range(len(tree.levels))]
        manifest = dict(format=CK_FORMAT, model=name, step=step, tokens=levels[0], levels=levels,
                        input=os.path.abspath(args.input), files=entries)
        fd = lock_dir(partial)  # held again until the rename: a build started now waits for this one's end
        try:
            atomic_write_json(manifest, os.path.join(partial, CK_FILE))
            os.rename(partial, out)
        except OSError as e:
            raise UserError(f"cannot move {partial} to {out} ({e.strerror})") from None
        finally:
            os.close(fd)
        print0(f"wrote {out}: {levels[0]:,} tokens, gists per level {levels[1:]}")
        print0(json.dumps(dict(out=out, files=len(files), tokens=levels[0], levels=levels, model=name, step=step)))
        return manifest
    finally:
        compute_cleanup()


if __name__ == "__main__":
    cli_main(main)
