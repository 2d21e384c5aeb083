"""
Pretraining batches: every row starts at a document's BOS and is packed best-fit from a
buffer of tokenized documents, with no padding. The documents come in upstream nanochat's
order, so a vanilla run here reads upstream's batches.

Filling a row of T+1 tokens: take the largest buffered document that fits the space left
(the oldest among equal lengths); when none fits, crop the shortest (the oldest among equal
lengths) to fill the row exactly and drop the rest of it. (So a document is either used whole
or cropped once; nothing is carried over to the next row.)

Data order: rank r of world W reads, in each file of the split in turn, row groups r, r+W,
r+2W, ... (see dataset.parquets_iter_batched); whenever the buffer holds fewer than
buffer_size documents it takes the next CHUNK (128) documents of that stream and tokenizes
them, so it holds buffer_size .. buffer_size+127. When the rank's row groups run out it starts
over from the first and epoch goes up by one. One guard upstream lacks: a chunk whose
documents are still in the buffer is not read again until they leave it (a dataset smaller
than the buffer never holds two copies of a document at once).

The state_dict yielded with a batch holds
    pq_idx, rg_idx, epoch  the row group (file index within the split, row group index within
                    that file) the newest chunk came from, and its epoch: upstream's state,
    row             the next unread document of that row group,
    buffer          the buffered documents as [pq_idx, rg_idx, row] references, in buffer order,
    rank, world_size  whose state this is.
Resume from it is exact: a new loader re-reads and re-tokenizes exactly those documents and
yields the same batches an uninterrupted loader would have. A state without `row` / `buffer`
(upstream nanochat writes only pq_idx/rg_idx/epoch) or from another rank/world size resumes
as upstream does: empty buffer, reading from row group (rg_idx // W + 1) * W + r of file
pq_idx (the next file's first if that is past its end).

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
from nanochat.dataset import split_paths, read_row_group, open_shard, strided_row_groups
from nanochat.longrange import TooShort, mix_documents

CHUNK = 128  # documents tokenized per refill (upstream's tokenizer batch)


def chunk_of(pq_idx, rg_idx, row):
    """The refill chunk a document came in: (pq_idx, rg_idx, row // CHUNK)."""
    return pq_idx, rg_idx, row // CHUNK


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
    num_row_groups = [open_shard(path).num_row_groups for path in paths]
    mine = strided_row_groups(num_row_groups, rank, world_size)
    if not mine:
        raise UserError(f"the {split} split's files have at most {max(num_row_groups)} row groups each, "
                        f"fewer than the {world_size} ranks reading it (rank {rank} would read none)")
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

    cache = {}  # the row group being read: (pq_idx, rg_idx) -> its texts

    def texts_of(key):
        if key not in cache:
            cache.clear()
            cache[key] = read_texts(*key)
        return cache[key]

    # The buffer, sorted by length (equal lengths in insertion order), as parallel lists:
    # lengths[i] = len(docs[i]); docs[i] = token ids with BOS first; refs[i] = (pq_idx, rg_idx, row)
    lengths, docs, refs = [], [], []
    in_buffer = Counter()  # chunk_of(ref) -> number of that chunk's documents in the buffer

    def add(tokens, ref):
        i = bisect.bisect_right(lengths, len(tokens))
        lengths.insert(i, len(tokens))
        docs.insert(i, tokens)
        refs.insert(i, ref)
        in_buffer[chunk_of(*ref)] += 1

    def take(i):
        lengths.pop(i)
        in_buffer[chunk_of(*refs.pop(i))] -= 1
        return docs.pop(i)

    # Position: the next document is row `row` of mine[k], in epoch `epoch` (row may be past the row group's
    # end until the next read moves on); `last` is the state's (pq_idx, rg_idx, epoch, row) after the newest chunk
    k, row, epoch = 0, 0, 1
    last = (*mine[0], 1, 0)
    if resume_state_dict is not None:
        state = resume_state_dict
        buffer = state.get("buffer", []) if isinstance(state, dict) else None
        if not isinstance(state, dict) or not all(type(state.get(key, 1)) is int for key in ("pq_idx", "rg_idx", "epoch", "row", "rank", "world_size")) \
                or "pq_idx" not in state or "rg_idx" not in state or not isinstance(buffer, list) \
                or not all(isinstance(r, (list, tuple)) and len(r) == 3 and all(type(x) is int and x >= 0 for x in r) for r in buffer):
            raise UserError(f"dataloader resume state is damaged (expected pq_idx, rg_idx, epoch integers and a buffer of "
                            f"[shard, row group, row] triples, got {str(state)[:120]})")
        pq_idx, rg_idx, epoch = state["pq_idx"], state["rg_idx"], state.get("epoch", 1)
        if not (0 <= pq_idx < len(paths) and 0 <= rg_idx < num_row_groups[pq_idx]):
            raise UserError(f"dataloader resume state (pq_idx={pq_idx}, rg_idx={rg_idx}) does not match "
                            f"the {split} shards in {os.path.dirname(paths[0])}")
        exact = all(key in state for key in ("buffer", "row")) and (pq_idx, rg_idx) in mine \
            and state.get("rank", 0) == rank and state.get("world_size", 1) == world_size
        if exact:
            k, row = mine.index((pq_idx, rg_idx)), state["row"]
            last = (pq_idx, rg_idx, epoch, row)
            restore_buffer(state["buffer"], paths, num_row_groups, read_texts, tokenizer, bos, lengths, docs, refs)
            in_buffer.update(chunk_of(*ref) for ref in refs)
        else:  # upstream's resume: the next stride block of row groups in that file
            start = (pq_idx, (rg_idx // world_size + 1) * world_size + rank)
            k = next((i for i, key in enumerate(mine) if key >= start), None)
            if k is None:
                k, epoch = 0, epoch + 1
            print0(f"dataloader: approximate resume of the {split} split after pq_idx={pq_idx}, rg_idx={rg_idx}, "
                   f"epoch={epoch} (no buffer state for rank {rank} of {world_size})")

    def next_texts():
        """Move the position past exhausted row groups; the texts of the one it is in."""
        nonlocal k, row, epoch
        for _ in range(len(mine) + 1):  # normally at most one step; the bound guards against empty data
            texts = texts_of(mine[k])
            if row < len(texts):
                return texts
            k, row = k + 1, 0
            if k == len(mine):
                k, epoch = 0, epoch + 1
        raise UserError(f"the {split} row groups of rank {rank} hold no documents")

    def next_chunk_key():
        next_texts()
        return chunk_of(*mine[k], row)

    def refill():
        nonlocal row, last
        texts = next_texts()
        chunk = texts[row:row + CHUNK]
        for j, tokens in enumerate(tokenizer.encode(chunk, prepend=bos)):
            add(tokens, (*mine[k], row + j))
        row += len(chunk)
        last = (*mine[k], epoch, row)

    def state_dict():
        pq_idx, rg_idx, last_epoch, last_row = last
        return {"pq_idx": pq_idx, "rg_idx": rg_idx, "epoch": last_epoch, "row": last_row, "rank": rank,
                "world_size": world_size, "buffer": [list(ref) for ref in refs]}

    while True:
        rows = []
        for _ in range(B):
            out = []
            while len(out) < row_len:
                # top up the buffer, but never with a second copy of a document (tiny datasets)
                while len(docs) < buffer_size and in_buffer[next_chunk_key()] == 0:
                    refill()
                space = row_len - len(out)
                i = bisect.bisect_right(lengths, space) - 1  # the largest length that fits whole ...
                if i >= 0:
                    out.extend(take(bisect.bisect_left(lengths, lengths[i])))  # ... its oldest document
                else:
                    out.extend(take(0)[:space])  # nothing fits: crop the shortest (oldest), drop its remainder
            rows.append(out)
        batch = torch.tensor(rows, dtype=torch.long)  # (B, T+1)
        inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # (B, T) each
        if device.type == "cuda":
            inputs = inputs.pin_memory().to(device, non_blocking=True)
            targets = targets.pin_memory().to(device, non_blocking=True)
        else:
            inputs, targets = inputs.to(device), targets.to(device)
        yield inputs, targets, state_dict()


def restore_buffer(buffer_refs, paths, num_row_groups, read_texts, tokenizer, bos, lengths, docs, refs):
    """Re-read (read_texts(pq_idx, rg_idx) -> the row group's documents) and re-tokenize the
    documents named by buffer_refs into the (empty) buffer lists, in the saved order; checks
    that they come out sorted, i.e. that the data did not change."""
    wanted = {}  # (pq_idx, rg_idx) -> rows needed from that row group
    for pq_idx, rg_idx, row in buffer_refs:
        wanted.setdefault((pq_idx, rg_idx), set()).add(row)
    tokens_of = {}
    for (pq_idx, rg_idx), rows in wanted.items():
        if not (0 <= pq_idx < len(paths) and 0 <= rg_idx < num_row_groups[pq_idx]):
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
