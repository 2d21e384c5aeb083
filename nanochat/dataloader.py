"""
Pretraining batches: every row starts at a document's BOS and is packed best-fit from a
buffer of tokenized documents, with no padding.

Filling a row of T+1 tokens: take the largest buffered document that fits the space left;
when none fits, crop the shortest one to fill the row exactly and drop the rest of it.
(So a document is either used whole or cropped once; nothing is carried over to the next
row, and the buffer only ever holds whole documents.)

Data order: rank r of world W reads the split's row groups r, r+W, r+2W, ... (counted over
all the split's files, see dataset.parquets_iter_batched); each row group read is tokenized
and poured into the buffer whenever the buffer holds fewer than buffer_size documents, unless
documents of that row group are still in the buffer (so a dataset smaller than the buffer
never holds two copies of a document at once). When the rank's row groups run out, it starts
over from the first and epoch goes up by one.

Resume is exact: the state_dict yielded with a batch holds
    pq_idx, rg_idx  the next row group this rank will read (file index within the split,
                    row group index within that file), epoch  its epoch (starts at 1),
    buffer          the buffered documents as [pq_idx, rg_idx, row] references, in buffer order,
    rank, world_size  whose state this is.
A new loader re-reads and re-tokenizes exactly those documents and yields the same batches
an uninterrupted loader would have. A state without `buffer` (upstream nanochat writes only
pq_idx/rg_idx/epoch) or from another rank/world size resumes approximately: empty buffer,
reading from this rank's first row group at or after (pq_idx, rg_idx).

Synthetic long-range documents (long_range_frac > 0, see longrange.py): each row group read
gets round(long_range_frac * len(texts)) of them appended after its real texts, each
long_range_tokens tokens long including its BOS (default T+1: one whole row; best-fit then
packs it first in a row, its answer within the row's last 16 tokens), with filler from the
row group's own texts.
They are generated from a seed of (pq_idx, rg_idx) alone, so they are the same on every epoch
and every world size, and their buffer references (pq_idx, rg_idx, len(texts) + j) are resumed
exactly like real rows. long_range_frac = 0 reads only the real texts.
"""

import os
import bisect
from collections import Counter

import torch

from nanochat.common import UserError, get_dist_info, print0
from nanochat.dataset import split_paths, row_group_offsets, locate_row_group, read_row_group
from nanochat.longrange import TooShort, mix_documents


def bos_bestfit_loader(tokenizer, B, T, split, device="cpu", resume_state_dict=None, buffer_size=1000, data_dir=None,
                       long_range_frac=0.0, long_range_tokens=None):
    """Infinite generator of (inputs [B, T] int64, targets [B, T] int64, state_dict)."""
    if not 0.0 <= long_range_frac <= 1.0:
        raise UserError(f"the long-range document fraction must be in [0, 1], got {long_range_frac}")
    long_range_tokens = T + 1 if long_range_tokens is None else long_range_tokens
    if long_range_frac > 0 and not 2 <= long_range_tokens <= T + 1:
        raise UserError(f"long-range documents of {long_range_tokens} tokens do not fit a row of T+1 = {T + 1} tokens "
                        f"whole (their answer is their last tokens); use 2..{T + 1}")
    _, rank, _, world_size = get_dist_info()
    paths = split_paths(split, data_dir)
    offsets = row_group_offsets(paths)
    total = offsets[-1]  # row groups in the split
    if total < world_size:
        raise UserError(f"the {split} split has {total} row groups, fewer than the {world_size} ranks reading it")
    num_mine = len(range(rank, total, world_size))  # this rank's row groups per epoch
    bos = tokenizer.get_bos_token_id()
    row_len = T + 1  # inputs are row[:-1], targets row[1:]
    device = torch.device(device)

    def read_texts(pq_idx, rg_idx):
        """The documents of a row group: its real texts, then its synthetic long-range ones."""
        texts = read_row_group(paths[pq_idx], rg_idx)
        if long_range_frac > 0:
            seed = pq_idx * 1_000_003 + rg_idx  # not rank, world size or epoch: a resume regenerates them
            try:
                texts = texts + mix_documents(texts, long_range_frac, seed, long_range_tokens - 1,  # - 1: the BOS
                                              lambda text: len(tokenizer.encode(text)))
            except TooShort as e:  # in the flag's count, BOS included
                raise UserError(f"long-range documents of {long_range_tokens} tokens (BOS included): a {e.kind} document "
                                f"needs at least {e.needed + 1}") from None
        return texts

    # The buffer, sorted by length (equal lengths in insertion order), as parallel lists:
    # lengths[i] = len(docs[i]); docs[i] = token ids with BOS first; refs[i] = (pq_idx, rg_idx, row)
    lengths, docs, refs = [], [], []
    in_buffer = Counter()  # (pq_idx, rg_idx) -> number of its documents in the buffer

    def add(tokens, ref):
        i = bisect.bisect_right(lengths, len(tokens))
        lengths.insert(i, len(tokens))
        docs.insert(i, tokens)
        refs.insert(i, ref)
        in_buffer[ref[:2]] += 1

    def take(i):
        lengths.pop(i)
        in_buffer[refs.pop(i)[:2]] -= 1
        return docs.pop(i)

    # Position: k = index of the next row group among this rank's (global index rank + k*world)
    k, epoch = 0, 1
    if resume_state_dict is not None:
        state = resume_state_dict
        buffer = state.get("buffer", []) if isinstance(state, dict) else None
        if not isinstance(state, dict) or not all(type(state.get(k, 1)) is int for k in ("pq_idx", "rg_idx", "epoch", "rank", "world_size")) \
                or "pq_idx" not in state or "rg_idx" not in state or not isinstance(buffer, list) \
                or not all(isinstance(r, (list, tuple)) and len(r) == 3 and all(type(x) is int and x >= 0 for x in r) for r in buffer):
            raise UserError(f"dataloader resume state is damaged (expected pq_idx, rg_idx, epoch integers and a buffer of "
                            f"[shard, row group, row] triples, got {str(state)[:120]})")
        pq_idx, rg_idx, epoch = state["pq_idx"], state["rg_idx"], state.get("epoch", 1)
        if not (0 <= pq_idx < len(paths) and 0 <= rg_idx < offsets[pq_idx + 1] - offsets[pq_idx]):
            raise UserError(f"dataloader resume state (pq_idx={pq_idx}, rg_idx={rg_idx}) does not match "
                            f"the {split} shards in {os.path.dirname(paths[0])}")
        g = offsets[pq_idx] + rg_idx
        k = max(0, -(-(g - rank) // world_size))  # first of this rank's row groups at or after g
        if k >= num_mine:
            k, epoch = 0, epoch + 1
        exact = "buffer" in state and state.get("rank", 0) == rank and state.get("world_size", 1) == world_size
        if exact:
            restore_buffer(state["buffer"], paths, offsets, read_texts, tokenizer, bos, lengths, docs, refs)
            in_buffer.update(ref[:2] for ref in refs)
        else:
            print0(f"dataloader: approximate resume of the {split} split from pq_idx={pq_idx}, rg_idx={rg_idx}, "
                   f"epoch={epoch} (no buffer state for rank {rank} of {world_size})")

    def next_row_group():
        return locate_row_group(offsets, rank + k * world_size)

    def refill():
        nonlocal k, epoch
        for _ in range(num_mine + 1):  # normally one pass; the loop only guards against empty data
            pq_idx, rg_idx = next_row_group()
            texts = read_texts(pq_idx, rg_idx)
            for row, tokens in enumerate(tokenizer.encode(texts, prepend=bos) if texts else []):
                add(tokens, (pq_idx, rg_idx, row))
            k += 1
            if k == num_mine:
                k, epoch = 0, epoch + 1
            if texts:
                return
        raise UserError(f"the {split} row groups of rank {rank} hold no documents")

    def state_dict():
        pq_idx, rg_idx = next_row_group()
        return {"pq_idx": pq_idx, "rg_idx": rg_idx, "epoch": epoch, "rank": rank, "world_size": world_size,
                "buffer": [list(ref) for ref in refs]}

    while True:
        rows = []
        for _ in range(B):
            row = []
            while len(row) < row_len:
                # top up the buffer, but never with a second copy of a document (tiny datasets)
                while len(docs) < buffer_size and in_buffer[next_row_group()] == 0:
                    refill()
                space = row_len - len(row)
                i = bisect.bisect_right(lengths, space) - 1  # the largest document that fits whole
                if i >= 0:
                    row.extend(take(i))
                else:
                    row.extend(take(0)[:space])  # nothing fits: crop the shortest, drop its remainder
            rows.append(row)
        batch = torch.tensor(rows, dtype=torch.long)  # (B, T+1)
        inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # (B, T) each
        if device.type == "cuda":
            inputs = inputs.pin_memory().to(device, non_blocking=True)
            targets = targets.pin_memory().to(device, non_blocking=True)
        else:
            inputs, targets = inputs.to(device), targets.to(device)
        yield inputs, targets, state_dict()


def restore_buffer(buffer_refs, paths, offsets, read_texts, tokenizer, bos, lengths, docs, refs):
    """Re-read (read_texts(pq_idx, rg_idx) -> the row group's documents) and re-tokenize the
    documents named by buffer_refs into the (empty) buffer lists, in the saved order; checks
    that they come out sorted, i.e. that the data did not change."""
    wanted = {}  # (pq_idx, rg_idx) -> rows needed from that row group
    for pq_idx, rg_idx, row in buffer_refs:
        wanted.setdefault((pq_idx, rg_idx), set()).add(row)
    tokens_of = {}
    for (pq_idx, rg_idx), rows in wanted.items():
        if not (0 <= pq_idx < len(paths) and 0 <= rg_idx < offsets[pq_idx + 1] - offsets[pq_idx]):
            raise UserError(f"dataloader resume state names row group {rg_idx} of shard {pq_idx}, which does not exist")
        texts = read_texts(pq_idx, rg_idx)
        rows = sorted(rows)
        if rows[-1] >= len(texts):
            raise UserError(f"dataloader resume state names row {rows[-1]} of {paths[pq_idx]} row group {rg_idx}, "
                            f"which has {len(texts)} rows")
        for row, tokens in zip(rows, tokenizer.encode([texts[r] for r in rows], prepend=bos)):
            tokens_of[(pq_idx, rg_idx, row)] = tokens
    for pq_idx, rg_idx, row in buffer_refs:
        tokens = tokens_of[(pq_idx, rg_idx, row)]
        if lengths and len(tokens) < lengths[-1]:
            raise UserError("dataloader resume state does not match the data (buffer no longer sorted by length); "
                            "were the shards or the tokenizer changed?")
        lengths.append(len(tokens))
        docs.append(tokens)
        refs.append((pq_idx, rg_idx, row))
