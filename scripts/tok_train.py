"""
Train the BPE tokenizer on the pretraining shards.

    python -m scripts.tok_train                                   # 2B chars, vocab 32768
    python -m scripts.tok_train --max-chars 100000000 --vocab-size 8192

Writes <base>/tokenizer/tokenizer.pkl and <base>/tokenizer/token_bytes.pt (the UTF-8 byte
length of every token, 0 for specials; used for bits per byte).
"""

import os
import sys
import time
import argparse

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanochat.common import DIGEST_SUFFIX, UserError, cli_main, get_base_dir, atomic_torch_save
from nanochat.tokenizer import RustBPETokenizer, SPECIAL_TOKENS, compute_token_bytes
from nanochat.checkpoint_manager import MAX_SIZES


def main():
    parser = argparse.ArgumentParser(description="Train a BPE tokenizer on the training shards")
    parser.add_argument("--max-chars", type=int, default=2_000_000_000, help="stop reading once this many characters are in (the document that crosses it is kept whole)")
    parser.add_argument("--doc-cap", type=int, default=10_000, help="use at most this many characters of each document")
    parser.add_argument("--vocab-size", type=int, default=32768, help="vocab size, special tokens included")
    parser.add_argument("--overwrite", action="store_true", help="replace the tokenizer already in <base>/tokenizer (else it refuses)")
    args = parser.parse_args()
    min_vocab = 256 + len(SPECIAL_TOKENS)
    if not min_vocab <= args.vocab_size <= MAX_SIZES["vocab_size"]:
        raise UserError(f"--vocab-size must be {min_vocab} (256 bytes + {len(SPECIAL_TOKENS)} special tokens) to "
                        f"{MAX_SIZES['vocab_size']:,}, got {args.vocab_size}")
    if args.max_chars <= 0:
        raise UserError(f"--max-chars must be positive, got {args.max_chars}")
    if args.doc_cap <= 0:
        raise UserError(f"--doc-cap must be positive, got {args.doc_cap}")
    tokenizer_dir = os.path.join(get_base_dir(), "tokenizer")
    if os.path.exists(os.path.join(tokenizer_dir, "tokenizer.pkl")) and not args.overwrite:
        raise UserError(f"{tokenizer_dir} already holds a tokenizer, and the checkpoints trained with it load only with it "
                        "(their metas name its fingerprint): --overwrite replaces it")
    print(f"max_chars: {args.max_chars:,}  doc_cap: {args.doc_cap:,}  vocab_size: {args.vocab_size:,}", flush=True)

    from nanochat.dataset import parquets_iter_batched  # imported here: only this script needs the shards

    # Stream documents, each capped at doc_cap chars, until max_chars have gone by.
    stats = {"chars": 0, "docs": 0}
    def text_iterator():
        report_every = max(1, args.max_chars // 10)
        next_report = report_every
        for batch in parquets_iter_batched("train"):
            for doc in batch:
                if doc is None:  # a null cell in the text column
                    continue
                doc = doc[:args.doc_cap]
                stats["chars"] += len(doc)
                stats["docs"] += 1
                yield doc
                if stats["chars"] >= next_report:
                    print(f"  read {stats['chars']:,} chars / {args.max_chars:,} ({stats['docs']:,} docs)", flush=True)
                    next_report += report_every
                if stats["chars"] >= args.max_chars:
                    return

    t0 = time.time()
    tokenizer = RustBPETokenizer.train_from_iterator(text_iterator(), args.vocab_size)
    train_time = time.time() - t0
    if stats["chars"] == 0:
        raise UserError("the training shards hold no text")
    print(f"trained on {stats['chars']:,} chars ({stats['docs']:,} docs) in {train_time:.2f}s", flush=True)
    vocab_size = tokenizer.get_vocab_size()
    if vocab_size < args.vocab_size:
        print(f"warning: the text ran out of pairs to merge; vocab is {vocab_size:,}, not {args.vocab_size:,}", flush=True)

    # Sanity check: encode/decode must round-trip, specials included
    sample = "Hello world! This is a test.\nNumbers: 123, 4567. Unicode: 你好 🚀\t<|bos|> stays text."
    if tokenizer.decode(tokenizer.encode(sample)) != sample:
        raise RuntimeError("tokenizer does not round-trip the sample text")

    token_bytes = compute_token_bytes(tokenizer)  # (vocab,) int32
    token_bytes_path = os.path.join(tokenizer_dir, "token_bytes.pt")
    for old in (token_bytes_path, token_bytes_path + DIGEST_SUFFIX):  # the old tokenizer's: stopped between the two
        if os.path.exists(old):                                   # saves below, no pair that disagrees is left
            os.remove(old)
    path = tokenizer.save(tokenizer_dir)
    print(f"saved {path}", flush=True)
    atomic_torch_save(token_bytes, token_bytes_path)
    nonzero = token_bytes[token_bytes > 0].float()
    print(f"saved {os.path.join(tokenizer_dir, 'token_bytes.pt')}: {len(SPECIAL_TOKENS)} special tokens, "
          f"token bytes min {int(nonzero.min())} max {int(nonzero.max())} mean {nonzero.mean():.2f}", flush=True)
    from nanochat.report import get_report
    get_report().log(section="Tokenizer training", data=[vars(args), {
        "vocab_size": vocab_size, "train_chars": stats["chars"], "train_docs": stats["docs"], "train_time_s": round(train_time, 2),
        "token_bytes_mean": round(float(nonzero.mean()), 3), "wall_clock_s": round(train_time, 2)}])


if __name__ == "__main__":
    cli_main(main)
