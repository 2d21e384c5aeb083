"""
Talk to a model in the terminal.

    python -m scripts.chat_cli                     # interactive, the latest SFT model
    python -m scripts.chat_cli -i base -p "Hi"     # one prompt, one answer, exit
    python -m scripts.chat_cli --megacontext       # the conversation lives in a MegaContext: no length limit
    python -m scripts.chat_cli --gist-first        # MegaContext, each block's gist predicted before its tokens
    python -m scripts.chat_cli --megacontext --session ~/chats/a   # kept on disk, resumed next time
    python -m scripts.chat_cli --ck ~/ck/docs      # with a Core-Knowledge memory (scripts/mc_build_ck.py)
Commands in the interactive loop: `clear` starts a new conversation, `quit` (or `exit`, Ctrl-D) leaves,
`/focus` (MegaContext) shows what the model sees: the working context's LOD mix and budget use.
With --megacontext the conversation is fed, turn by turn, into a runtime Session
(nanochat/megacontext/runtime.py): the model reads a fixed budget of w_max slots (raw recent tokens,
gists of older ones) however long the conversation grows, at a constant cost per token.
--context-file feeds a text file (a book, a log) into the history before the first turn.
--ck PATH (repeatable) attaches Core-Knowledge memories in front of the conversation: the working
context holds gists of them too, and LensNet opens what the conversation needs (`/focus` shows each
memory's part). A resumed --session brings its memories back by itself.
"""

import os
import sys
import shutil
import argparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanochat.common import UserError, cli_main, compute_init, autodetect_device_type
from nanochat.checkpoint_manager import load_model
from nanochat.engine import Engine, temperature_problem

def stream_reply(engine, tokenizer, conversation, args, out=None):
    """Generate the assistant's reply to `conversation`, printing it as it streams; returns its
    message content (text, or parts when it called the calculator) for the history."""
    out = out or sys.stdout
    tokens = tokenizer.render_for_completion({"messages": conversation["messages"] + [{"role": "assistant", "content": ""}]})
    limit = engine.model.cos.size(1)  # the rotary table: the most positions the model can read
    if len(tokens) >= limit:
        raise UserError(f"the conversation is {len(tokens):,} tokens and this model reads at most {limit:,}: "
                        "`clear` starts over, or chat with --megacontext (no length limit)")
    generated = []
    printed = ""
    for column, _ in engine.generate(tokens, num_samples=1, max_tokens=args.max_tokens, temperature=args.temperature,
                                     top_k=args.top_k, seed=args.seed):
        token = column[0]
        if token in engine.stop_tokens:
            break
        generated.append(token)
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[len(printed):])
            out.flush()
            printed = text
    out.write(tokenizer.decode(generated)[len(printed):] + "\n")
    return tokenizer.parse_assistant(generated)

def user_lines():
    """The interactive loop's input: stripped, non-empty lines until `quit`, `exit` or Ctrl-D."""
    while True:
        try:
            line = input("\nUser: ").strip()
        except EOFError:
            print()
            return
        if line in ("quit", "exit"):
            return
        if line:
            yield line


def turn_tokens(tokenizer, text, first):
    """One user turn, rendered as in a whole conversation: [<|bos|>] <|user_start|> text <|user_end|> <|assistant_start|>."""
    ids = tokenizer.render_for_completion({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]})
    return ids if first else ids[1:]  # the BOS opens the conversation only


def stream_session_reply(session, tokenizer, tools, args, out=None):
    """The MegaContext twin of stream_reply: the session already holds the prompt; every token
    generated is fed back into its history, which ends the turn with <|assistant_end|> (whichever stop
    token came, or after a --max-tokens cut)."""
    out = out or sys.stdout
    generated, printed, ended = [], "", False
    for token, _ in session.generate(args.max_tokens, temperature=args.temperature, top_k=args.top_k, tools=tools):
        if token in tools.stop_tokens:
            ended = True
            break
        generated.append(token)
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):
            out.write(text[len(printed):])
            out.flush()
            printed = text
    if not ended:  # cut at --max-tokens: close the turn so the history keeps the chat format
        session.feed([tokenizer.encode_special("<|assistant_end|>")])
    out.write(tokenizer.decode(generated)[len(printed):] + "\n")
    return generated


def open_session(args, model, tokenizer, device, model_tag, step):
    """A new MegaContext session (in RAM, or on disk at --session), or the one saved at --session."""
    from nanochat.megacontext.checkpoint import chat_model_name, load_for_chat
    from nanochat.megacontext.runtime import Session
    from nanochat.megacontext.session_file import SESSION_FILE
    mc, gistnet, lensnet, predictor = load_for_chat(args.source, model_tag, step, model, device)
    name = chat_model_name(args.source, model_tag, step)
    if args.session and os.path.exists(os.path.join(args.session, SESSION_FILE)):
        if args.context_file:
            raise UserError(f"--context-file reads a file into a new session; the one at {args.session} is resumed "
                            "(paste the text as a message, or start another --session)")
        session = Session.open(args.session, model, gistnet, lensnet, mc, predictor, gist_first=args.gist_first, model_name=name)
        if args.w_max is not None and args.w_max != session.w_max:
            raise UserError(f"the session at {args.session} was saved with --w-max {session.w_max}: give that or none")
        saved = [path for _, _, path in session.memories]
        if args.ck and [os.path.abspath(p) for p in args.ck] != saved:
            raise UserError(f"the session at {args.session} was saved with Core-Knowledge memories {saved or 'none'}: "
                            "give the same --ck paths or none")
        print(f"resumed the session at {args.session}: {session.tree.num_tokens:,} tokens of history"
              + "".join(f", memory {n} ({t.num_tokens:,} tokens)" for n, t, _ in session.memories))
        return session, session.tree.num_tokens == 0  # saved before its first turn: that turn still opens with BOS
    if args.session and os.path.exists(os.path.join(args.session, "meta.json")):  # a tree with no session.json in it
        raise UserError(f"--session {args.session} holds a MegaContext tree that is not a chat session (a Core-Knowledge "
                        "memory? attach it with --ck): give another directory")
    # a new session on disk is whole or absent: a refused --ck or --context-file (or ctrl-C while reading it)
    # removes what this call wrote, so the same --session works again once the command is mended
    before = set(os.listdir(args.session)) if args.session and os.path.isdir(args.session) else None
    try:
        session = Session.create(model, gistnet, lensnet, mc, path=args.session or None, predictor=predictor, w_max=args.w_max,
                                 gist_first=bool(args.gist_first), seed=args.seed, model_name=name)
        for path in args.ck:
            session.attach(path)
            print(f"attached the Core-Knowledge memory {path} ({session.memories[-1][1].num_tokens:,} tokens)")
        if args.context_file:
            try:
                with open(args.context_file, encoding="utf-8") as f:
                    text = f.read()
            except UnicodeDecodeError as e:
                raise UserError(f"--context-file {args.context_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            ids = tokenizer.encode(text, prepend=tokenizer.get_bos_token_id())
            print(f"reading {args.context_file} into the history ({len(ids):,} tokens) ...", flush=True)
            session.feed(ids)
            if args.session:
                session.save()  # kept even if the user leaves before the first reply
    except BaseException:
        if args.session and os.path.isdir(args.session):
            if before is None:
                shutil.rmtree(args.session, ignore_errors=True)
            else:
                for entry in set(os.listdir(args.session)) - before:
                    target = os.path.join(args.session, entry)
                    if os.path.isdir(target):
                        shutil.rmtree(target, ignore_errors=True)
                    else:
                        os.remove(target)
        raise
    return session, not args.context_file


def megacontext_chat(args, model, tokenizer, device, model_tag, step):
    from nanochat.engine import ToolUse
    from nanochat.megacontext.runtime import format_focus
    tools = ToolUse(tokenizer)
    session, first = open_session(args, model, tokenizer, device, model_tag, step)

    def reply(text):
        nonlocal first
        session.feed(turn_tokens(tokenizer, text, first))
        first = False
        stream_session_reply(session, tokenizer, tools, args)
        if args.session:
            session.save()

    if args.prompt is not None:
        reply(args.prompt)
        return
    print(f"nanochat + MegaContext (w_max {session.w_max}, nothing dropped up to {session.reach:,} tokens"
          f"{', gist-first' if session.gist_first else ''}): "
          "type a message; `/focus` shows the working context, `clear` starts over, `quit` leaves.")
    for line in user_lines():
        if line == "/focus":
            print(format_focus(session.focus()))
            continue
        if line == "clear":
            if args.session:
                print("(a saved session is not cleared: quit and start with another --session)")
                continue
            session, first = open_session(args, model, tokenizer, device, model_tag, step)
            print("(new conversation)")
            continue
        print("\nAssistant: ", end="", flush=True)
        reply(line)


def main():
    p = argparse.ArgumentParser(description="Chat with a nanochat model", allow_abbrev=False)
    p.add_argument("-i", "--source", type=str, default="sft", choices=["base", "sft", "rl"], help="which checkpoints to load")
    p.add_argument("-g", "--model-tag", type=str, default=None)
    p.add_argument("-s", "--step", type=int, default=None)
    p.add_argument("-p", "--prompt", type=str, default=None, help="answer this one prompt and exit")
    p.add_argument("-t", "--temperature", type=float, default=0.6)
    p.add_argument("-k", "--top-k", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device-type", type=str, default="")
    p.add_argument("--megacontext", action="store_true", help="keep the conversation in a MegaContext (no length limit)")
    p.add_argument("--gist-first", action="store_true", default=None,  # None: a resumed --session decodes as it was saved
                   help="MegaContext with gist-first decoding (needs a --megaprediction run)")
    p.add_argument("--w-max", type=int, default=None, help="MegaContext working-context budget (default: the run's mc_w_max)")
    p.add_argument("--session", type=str, default="", help="MegaContext: keep the session in this directory (resumed if it exists)")
    p.add_argument("--context-file", type=str, default="", help="MegaContext: feed this text file into the history first")
    p.add_argument("--ck", type=str, action="append", default=[], help="attach a Core-Knowledge memory built by "
                   "scripts.mc_build_ck (repeatable; implies --megacontext)")
    args = p.parse_args()
    if temperature_problem(args.temperature) or args.top_k < 1:
        p.error(temperature_problem(args.temperature) or "top-k must be at least 1")
    args.megacontext = args.megacontext or args.gist_first or bool(args.ck)
    if args.prompt is not None and not args.prompt.strip():  # an empty $VAR would otherwise wait on stdin for good
        p.error("-p/--prompt is empty: give the prompt's text, or leave -p out to chat")
    if not args.megacontext and (args.session or args.context_file or args.w_max is not None):
        p.error("--session, --context-file and --w-max need --megacontext")
    if args.context_file and not os.path.isfile(args.context_file):
        p.error(f"--context-file {args.context_file}: no such file")
    if args.session and os.path.exists(args.session) and not os.path.isdir(args.session):
        p.error(f"--session {args.session}: a file, not a directory")
    if args.max_tokens < 1:
        p.error(f"--max-tokens must be at least 1, got {args.max_tokens}")

    from nanochat.checkpoint_manager import resolve_checkpoint
    _, _, _, _, device = compute_init(args.device_type or autodetect_device_type())
    _, model_tag, step = resolve_checkpoint(args.source, args.model_tag, args.step)
    model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=model_tag, step=step)
    if args.megacontext:
        megacontext_chat(args, model, tokenizer, device, model_tag, step)
        return
    engine = Engine(model, tokenizer)

    if args.prompt is not None:
        stream_reply(engine, tokenizer, {"messages": [{"role": "user", "content": args.prompt}]}, args)
        return

    print("nanochat: type a message; `clear` starts over, `quit` leaves.")
    messages = []
    for line in user_lines():
        if line == "clear":
            messages = []
            print("(new conversation)")
            continue
        print("\nAssistant: ", end="", flush=True)
        try:
            reply = stream_reply(engine, tokenizer, {"messages": messages + [{"role": "user", "content": line}]}, args)
        except UserError as e:  # the context is full: say so and keep the conversation as it was
            print(f"({e})")
            continue
        messages += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]

if __name__ == "__main__":
    cli_main(main)
