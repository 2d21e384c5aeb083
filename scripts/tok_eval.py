"""
Compression ratio (UTF-8 bytes per token; higher is better) of our tokenizer on a few kinds
of text, next to GPT-2's and GPT-4's (cl100k) tokenizers when tiktoken has them cached
(they are downloaded on first use; offline they are skipped with a note).

    python -m scripts.tok_eval
"""

import os
import sys
import threading
import argparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanochat.common import UserError, cli_main
from nanochat.tokenizer import get_tokenizer

SAMPLES = {
    "news": (
        "The city council voted on Tuesday to extend the night bus service through the winter, "
        "after a pilot program drew more riders than expected. Officials said the route along the "
        "river would run every twenty minutes between midnight and five in the morning, and that "
        "fares would stay at the current level until at least next spring."
    ),
    "korean": (
        "오늘 아침에는 비가 조금 내렸지만 오후에는 날씨가 맑아졌다. 우리는 공원에서 산책을 하고 "
        "근처 카페에서 따뜻한 차를 마셨다. 저녁에는 친구들과 함께 저녁을 먹으며 이야기를 나누었다."
    ),
    "code": (
        "def merge_intervals(intervals):\n"
        "    intervals = sorted(intervals, key=lambda iv: iv[0])\n"
        "    merged = []\n"
        "    for start, end in intervals:\n"
        "        if merged and start <= merged[-1][1]:\n"
        "            merged[-1][1] = max(merged[-1][1], end)\n"
        "        else:\n"
        "            merged.append([start, end])\n"
        "    return merged\n"
    ),
    "math": (
        "Let $f(x) = \\sum_{n=0}^{\\infty} \\frac{x^n}{n!}$. Then $f'(x) = f(x)$ and $f(0) = 1$, so "
        "$f(x) = e^x$. For instance $f(2) \\approx 7.389056$ and $\\int_0^1 f(t)\\,dt = e - 1 \\approx 1.718282$."
    ),
    "science": (
        "Photosynthesis converts light energy into chemical energy: 6 CO2 + 6 H2O -> C6H12O6 + 6 O2. "
        "In the light-dependent reactions, chlorophyll absorbs photons near 430 nm and 662 nm, and the "
        "resulting electron transport chain pumps protons across the thylakoid membrane."
    ),
}


def load_tiktoken(name, timeout_s=20.0):
    """tiktoken.get_encoding(name), or (None, reason) if it can't be had quickly (offline)."""
    result = {}
    def target():
        try:
            import tiktoken
            result["enc"] = tiktoken.get_encoding(name)
        except Exception as e:
            result["error"] = f"{type(e).__name__}"
    thread = threading.Thread(target=target, daemon=True)  # daemon: a stuck download can't block exit
    thread.start()
    thread.join(timeout_s)
    if "enc" in result:
        return result["enc"], None
    return None, result.get("error", f"no answer within {timeout_s:.0f}s")


def shard_samples():
    """The first row group of the train and val splits, where shards exist."""
    from nanochat.dataset import parquets_iter_batched
    texts = {}
    for split in ("train", "val"):
        try:
            batch = next(parquets_iter_batched(split), None)
        except UserError as e:
            print(f"note: skipping the {split} shard ({e})")
            continue
        if batch:
            texts[f"{split}-shard"] = "\n".join(doc for doc in batch if doc)
    return texts


def main():
    parser = argparse.ArgumentParser(description="Compare tokenizer compression ratios")
    parser.add_argument("--no-shards", action="store_true", help="only the built-in sample texts")
    parser.add_argument("--no-compare", action="store_true", help="don't try to load tiktoken's gpt2 / cl100k")
    args = parser.parse_args()

    ours = get_tokenizer()
    encoders = {f"ours ({ours.get_vocab_size()})": ours.encode}
    for name in ([] if args.no_compare else ["gpt2", "cl100k_base"]):
        enc, error = load_tiktoken(name)
        if enc is None:
            print(f"note: tiktoken {name} is not available offline ({error}); skipped")
        else:
            encoders[f"{name} ({enc.n_vocab})"] = enc.encode_ordinary

    texts = dict(SAMPLES)
    if not args.no_shards:
        texts.update(shard_samples())

    # one row per text: its size, then tokens and bytes/token for each tokenizer
    header = f"{'text':<14}{'bytes':>10}" + "".join(f"{name:>24}" for name in encoders)
    print(header)
    print("-" * len(header))
    table = [header, "-" * len(header)]
    for text_name, text in texts.items():
        n_bytes = len(text.encode("utf-8"))
        cells = []
        for encode in encoders.values():
            n_tokens = len(encode(text))
            cells.append(f"{n_tokens:>10,} tok {n_bytes / max(n_tokens, 1):>6.2f} B/t")
        row = f"{text_name:<14}{n_bytes:>10,}" + "".join(f"{cell:>24}" for cell in cells)
        print(row)
        table.append(row)
        if ours.decode(ours.encode(text)) != text:
            raise RuntimeError(f"our tokenizer does not round-trip the {text_name} text")
    from nanochat.report import get_report
    get_report().log(section="Tokenizer evaluation", data=["```\n" + "\n".join(table) + "\n```"])


if __name__ == "__main__":
    cli_main(main)
