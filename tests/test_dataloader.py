import os
import re
import json
import random

import pytest
import sys

import torch
import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import UserError
from nanochat.dataset import get_data_dir, shard_filename
from nanochat.dataloader import bos_bestfit_loader

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BOS = 0


class ByteTokenizer:
    """UTF-8 bytes shifted by one, BOS = 0: every id is a real token, so padding would show."""

    def get_bos_token_id(self):
        return BOS

    def encode(self, texts, prepend=None):
        assert isinstance(texts, list)
        head = [] if prepend is None else [prepend]
        return [head + [b + 1 for b in text.encode("utf-8")] for text in texts]


def write_parquet(path, row_groups):
    """row_groups: list of lists of texts, one parquet row group each."""
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for texts in row_groups:
            writer.write_table(pa.table({"text": pa.array(texts, type=pa.string())}))


def make_dataset(layout, max_len, seed=0):
    """Write shards into get_data_dir(): layout[pq_idx][rg_idx] = number of docs. Each doc is
    '<pq.rg.row>' followed by random letters (total length 1..max_len chars). The last file
    is the val shard. Returns {(pq, rg, row): text}."""
    rng = random.Random(seed)
    data_dir = get_data_dir()
    os.makedirs(data_dir, exist_ok=True)
    texts = {}
    for pq_idx, sizes in enumerate(layout):
        row_groups = []
        for rg_idx, n in enumerate(sizes):
            group = []
            for row in range(n):
                tag = f"<{pq_idx}.{rg_idx}.{row}>"
                text = tag + "".join(rng.choice("abcdefgh") for _ in range(rng.randint(0, max_len)))
                texts[(pq_idx, rg_idx, row)] = text
                group.append(text)
            row_groups.append(group)
        write_parquet(os.path.join(data_dir, shard_filename(pq_idx)), row_groups)
    return texts


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_DATASET", "test")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)


def set_rank(monkeypatch, rank, world_size):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # torchrun sets the rendezvous too (get_dist_info asks for it)
    monkeypatch.setenv("MASTER_PORT", "29500")


def full_rows(inputs, targets):
    return torch.cat([inputs[:, :1], targets], dim=1).tolist()  # (B, T+1)


def segments(row):
    """Split a row at its BOS tokens: a list of documents (or one cropped document at the end)."""
    starts = [i for i, t in enumerate(row) if t == BOS] + [len(row)]
    return [row[a:b] for a, b in zip(starts, starts[1:])]


def tag_of(segment):
    """(pq, rg, row) of a segment whose tag survived, else None."""
    m = re.match(r"<(\d+)\.(\d+)\.(\d+)>", bytes(t - 1 for t in segment[1:]).decode("utf-8", "replace"))
    return tuple(int(x) for x in m.groups()) if m else None


def take(loader, n):
    return [next(loader) for _ in range(n)]

# -----------------------------------------------------------------------------
# packing


@pytest.mark.parametrize("device", DEVICES)
def test_rows_are_bos_aligned_documents_without_padding(device):
    T, B = 64, 4
    texts = make_dataset([[8, 8, 5], [7, 8], [6]], max_len=3 * T)
    tok = ByteTokenizer()
    doc_tokens = {ref: tok.encode([t], prepend=BOS)[0] for ref, t in texts.items()}
    crops = multi = 0
    for inputs, targets, state in take(bos_bestfit_loader(tok, B, T, "train", device=device, buffer_size=10), 30):
        assert inputs.shape == targets.shape == (B, T)
        assert inputs.dtype == targets.dtype == torch.int64 and inputs.device.type == device
        assert torch.equal(inputs[:, 1:], targets[:, :-1])  # targets are inputs shifted by one
        for row in full_rows(inputs.cpu(), targets.cpu()):
            assert row[0] == BOS and len(row) == T + 1
            segs = segments(row)
            multi += len(segs) > 1
            for j, seg in enumerate(segs):
                ref = tag_of(seg)
                if ref is None:  # a crop so short that the tag is cut: still a prefix of some doc
                    assert j == len(segs) - 1
                    assert any(d[:len(seg)] == seg for d in doc_tokens.values())
                    continue
                assert ref[0] < 2, "the val shard leaked into train"
                full = doc_tokens[ref]
                assert seg == full[:len(seg)]
                if j < len(segs) - 1:
                    assert len(seg) == len(full), "only the last document of a row may be cropped"
                crops += len(seg) < len(full)
        assert json.loads(json.dumps(state)) == state
    assert crops > 0 and multi > 0  # the data exercised both cases


def test_best_fit_picks_largest_that_fits_then_crops_shortest():
    os.makedirs(get_data_dir(), exist_ok=True)
    # token lengths with BOS: 7, 5, 4, 3, 2
    write_parquet(os.path.join(get_data_dir(), shard_filename(0)), [["aaaaaa", "bbbb", "ccc", "dd", "e"]])
    write_parquet(os.path.join(get_data_dir(), shard_filename(1)), [["val"]])
    inputs, targets, _ = next(bos_bestfit_loader(ByteTokenizer(), 3, 9, "train", buffer_size=1))
    enc = lambda s: [BOS] + [b + 1 for b in s.encode()]
    rows = full_rows(inputs, targets)
    assert rows[0] == enc("aaaaaa") + enc("dd")           # 7 fits, then 3 fits the 3 left
    assert rows[1] == enc("bbbb") + enc("ccc") + [BOS]    # 5, 4, then nothing fits 1: crop "e" to its BOS
    assert rows[2] == rows[0]                             # buffer empty: the epoch wraps, same again

@pytest.mark.parametrize("rank,world_size,buffer_size,steps", [(0, 1, 1000, 150), (1, 2, 1000, 60), (0, 1, 200, 150)])
def test_batches_are_upstreams(monkeypatch, rank, world_size, buffer_size, steps):
    """The same rows as a plain reading of upstream's loader: ours refilled a whole row group at a time,
    took the newest of equal lengths and strode row groups across files. (Within an epoch: past it, a
    chunk whose documents are still buffered waits here, where upstream buffers a second copy.)"""
    import upstream_reference as ref
    from nanochat.dataset import list_parquet_files
    if world_size > 1:
        set_rank(monkeypatch, rank, world_size)
    T, B = 64, 4
    make_dataset([[600, 900, 500], [800, 700], [5]], max_len=90, seed=3)  # 3,500 train documents, lengths 6..100
    theirs = ref.reference_bestfit_rows(list_parquet_files()[:-1], ByteTokenizer(), B, T, rank, world_size,
                                        buffer_size=buffer_size)
    ours = bos_bestfit_loader(ByteTokenizer(), B, T, "train", buffer_size=buffer_size)
    for step in range(steps):
        inputs, targets, state = next(ours)
        assert full_rows(inputs, targets) == next(theirs), f"batch {step}"
    assert (state["pq_idx"], state["rg_idx"]) != (0, rank) and state["epoch"] == 1  # past the first row group


# -----------------------------------------------------------------------------
# DDP, epochs, resume


def test_ddp_ranks_read_disjoint_row_groups(monkeypatch):
    T = 48
    make_dataset([[4, 4, 4], [4, 4], [3]], max_len=T // 2)  # train: 5 row groups
    seen = {}
    for rank in range(2):
        set_rank(monkeypatch, rank, 2)
        refs = set()
        for inputs, targets, state in take(bos_bestfit_loader(ByteTokenizer(), 2, T, "train", buffer_size=4), 40):
            assert state["rank"] == rank and state["world_size"] == 2
            for row in full_rows(inputs, targets):
                refs.update(tag_of(s)[:2] for s in segments(row) if tag_of(s) is not None)
        seen[rank] = refs
    # as upstream: each file's row groups rank, rank + 2, ... (file 0 has 3, file 1 has 2)
    assert seen[0] == {(0, 0), (0, 2), (1, 0)}
    assert seen[1] == {(0, 1), (1, 1)}


def test_epoch_wraps_around(monkeypatch):
    T = 32
    make_dataset([[3, 3], [3], [2]], max_len=T)
    states = [s for _, _, s in take(bos_bestfit_loader(ByteTokenizer(), 2, T, "train", buffer_size=2), 40)]
    epochs = [s["epoch"] for s in states]
    assert epochs[0] == 1 and epochs == sorted(epochs) and epochs[-1] >= 3
    for prev, cur in zip(states, states[1:]):
        if cur["epoch"] > prev["epoch"]:
            assert (cur["pq_idx"], cur["rg_idx"]) == (0, 0)  # the next read is the first row group again


def test_small_dataset_never_buffers_a_document_twice():
    T = 32
    make_dataset([[3, 3], [3], [2]], max_len=2 * T)  # 9 train documents, buffer of 1000
    for _, _, state in take(bos_bestfit_loader(ByteTokenizer(), 2, T, "train"), 30):
        refs = [tuple(ref) for ref in state["buffer"]]
        assert len(set(refs)) == len(refs)
    assert state["epoch"] >= 3


def reference_and_resumed(T, B, buffer_size, n, ks, m):
    """Run one loader for n batches; for each k in ks resume a new loader from the state after
    batch k (JSON round trip) and return pairs (expected next m batches, resumed m batches)."""
    ref = take(bos_bestfit_loader(ByteTokenizer(), B, T, "train", buffer_size=buffer_size), n)
    pairs = []
    for k in ks:
        state = json.loads(json.dumps(ref[k][2]))
        resumed = take(bos_bestfit_loader(ByteTokenizer(), B, T, "train", resume_state_dict=state,
                                          buffer_size=buffer_size), m)
        pairs.append((ref[k + 1:k + 1 + m], resumed))
    return ref, pairs


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 2)])
@pytest.mark.parametrize("buffer_size", [1, 8, 1000])
def test_exact_resume(monkeypatch, rank, world_size, buffer_size):
    if world_size > 1:
        set_rank(monkeypatch, rank, world_size)
    T, B = 32, 2
    make_dataset([[6, 6, 6], [6, 5], [4]], max_len=2 * T, seed=1)
    ks = [0, 1, 4, 9, 17, 30]
    ref, pairs = reference_and_resumed(T, B, buffer_size, n=45, ks=ks, m=6)
    assert any(ref[k][2]["epoch"] >= 2 for k in ks)  # a resume point past an epoch wrap
    for expected, resumed in pairs:
        for (x0, y0, s0), (x1, y1, s1) in zip(expected, resumed):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
            assert s0 == s1


def test_resume_state_is_needed(monkeypatch):
    """Guard against a vacuous resume test: a fresh loader does not give the continuation."""
    T, B = 32, 2
    make_dataset([[6, 6, 6], [6, 5], [4]], max_len=2 * T, seed=1)
    ref = take(bos_bestfit_loader(ByteTokenizer(), B, T, "train", buffer_size=8), 6)
    fresh = next(bos_bestfit_loader(ByteTokenizer(), B, T, "train", buffer_size=8))
    assert not torch.equal(ref[5][0], fresh[0])
    # dropping the buffer (what an upstream-style state gives) also changes the continuation
    state = {k: ref[4][2][k] for k in ("pq_idx", "rg_idx", "epoch")}
    approx = next(bos_bestfit_loader(ByteTokenizer(), B, T, "train", resume_state_dict=state, buffer_size=8))
    assert not torch.equal(ref[5][0], approx[0])


def test_approximate_resume_from_upstream_state():
    """Upstream's state names the row group its newest documents came from; it resumes at the next one."""
    T = 48
    make_dataset([[4, 4], [4, 4], [3]], max_len=T // 2)
    state = {"pq_idx": 1, "rg_idx": 0, "epoch": 1}
    inputs, targets, new_state = next(bos_bestfit_loader(ByteTokenizer(), 1, T, "train", resume_state_dict=state,
                                                         buffer_size=1))
    assert tag_of(segments(full_rows(inputs, targets)[0])[0])[:2] == (1, 1)  # starts reading at (1, 1)
    assert (new_state["pq_idx"], new_state["rg_idx"], new_state["epoch"]) == (1, 1, 1)
    # past the split's last row group: the next epoch, from the first
    last = {"pq_idx": 1, "rg_idx": 1, "epoch": 1}
    inputs, targets, new_state = next(bos_bestfit_loader(ByteTokenizer(), 1, T, "train", resume_state_dict=last,
                                                         buffer_size=1))
    assert tag_of(segments(full_rows(inputs, targets)[0])[0])[:2] == (0, 0)
    assert (new_state["pq_idx"], new_state["rg_idx"], new_state["epoch"]) == (0, 0, 2)


def test_foreign_rank_state_resumes_on_own_row_groups(monkeypatch):
    T = 48
    make_dataset([[4, 4, 4], [4, 4], [3]], max_len=T // 2)
    set_rank(monkeypatch, 0, 2)
    state = next(bos_bestfit_loader(ByteTokenizer(), 1, T, "train", buffer_size=1))[2]
    assert (state["pq_idx"], state["rg_idx"]) == (0, 0)  # rank 0 reads (0, 0), (0, 2), (1, 0)
    set_rank(monkeypatch, 1, 2)
    batches = take(bos_bestfit_loader(ByteTokenizer(), 1, T, "train", resume_state_dict=state, buffer_size=1), 8)
    # rank 1 reads (0, 1), (1, 1): upstream's next stride block in file 0 is row group 3, past its end: (1, 1)
    assert tag_of(segments(full_rows(*batches[0][:2])[0])[0])[:2] == (1, 1)
    for inputs, targets, _ in batches:
        for seg in segments(full_rows(inputs, targets)[0]):
            assert tag_of(seg) is None or tag_of(seg)[:2] in {(0, 1), (1, 1)}


def test_errors():
    T = 16
    make_dataset([[4, 4], [3]], max_len=T)
    with pytest.raises(UserError, match="does not match"):
        next(bos_bestfit_loader(ByteTokenizer(), 1, T, "train", resume_state_dict={"pq_idx": 5, "rg_idx": 0}))
    with pytest.raises(UserError, match="row group 9"):
        bad = {"pq_idx": 0, "rg_idx": 0, "epoch": 1, "row": 1, "rank": 0, "world_size": 1, "buffer": [[0, 9, 0]]}
        next(bos_bestfit_loader(ByteTokenizer(), 1, T, "train", resume_state_dict=bad))


def test_fewer_row_groups_than_ranks(monkeypatch):
    make_dataset([[4, 4], [3]], max_len=8)
    set_rank(monkeypatch, 1, 2)
    with pytest.raises(UserError, match="fewer than the 2 ranks"):
        next(bos_bestfit_loader(ByteTokenizer(), 1, 8, "val"))
