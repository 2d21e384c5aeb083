"""
Talk to a model in the terminal.

    python -m scripts.chat_cli                     # interactive, the latest SFT model
    python -m scripts.chat_cli -i base -p "Hi"     # one prompt, one answer, exit
Commands in the interactive loop: `clear` starts a new conversation, `quit` (or `exit`, Ctrl-D) leaves.
"""

import os
import sys
import argparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanochat.common import cli_main, compute_init, autodetect_device_type
from nanochat.checkpoint_manager import load_model
from nanochat.engine import Engine

def stream_reply(engine, tokenizer, conversation, args, out=sys.stdout):
    """Generate the assistant's reply to `conversation`, printing it as it streams; returns its
    message content (text, or parts when it called the calculator) for the history."""
    tokens = tokenizer.render_for_completion({"messages": conversation["messages"] + [{"role": "assistant", "content": ""}]})
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

def main():
    p = argparse.ArgumentParser(description="Chat with a nanochat model", allow_abbrev=False)
    p.add_argument("-i", "--source", type=str, default="sft", choices=["base", "sft", "rl"], help="which checkpoints to load")
    p.add_argument("-g", "--model-tag", type=str, default=None)
    p.add_argument("-s", "--step", type=int, default=None)
    p.add_argument("-p", "--prompt", type=str, default="", help="answer this one prompt and exit")
    p.add_argument("-t", "--temperature", type=float, default=0.6)
    p.add_argument("-k", "--top-k", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device-type", type=str, default="")
    args = p.parse_args()
    if not 0 <= args.temperature <= 2 or args.top_k < 1:
        p.error("temperature must be in [0, 2] and top-k at least 1")

    _, _, _, _, device = compute_init(args.device_type or autodetect_device_type())
    model, tokenizer, _ = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    engine = Engine(model, tokenizer)

    if args.prompt:
        stream_reply(engine, tokenizer, {"messages": [{"role": "user", "content": args.prompt}]}, args)
        return

    print("nanochat: type a message; `clear` starts over, `quit` leaves.")
    messages = []
    while True:
        try:
            line = input("\nUser: ").strip()
        except EOFError:
            print()
            return
        if line in ("quit", "exit"):
            return
        if line == "clear":
            messages = []
            print("(new conversation)")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        print("\nAssistant: ", end="", flush=True)
        reply = stream_reply(engine, tokenizer, {"messages": messages}, args)
        messages.append({"role": "assistant", "content": reply})

if __name__ == "__main__":
    cli_main(main)
