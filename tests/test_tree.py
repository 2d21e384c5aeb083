"""
MegaContextTree: chunking invariance, every completed node gisted, node metadata, refresh and
versions, RAM / disk storage and their exact round trips, refusal of bad files, atomic metadata.
The GistNet here is a tiny deterministic stand-in (row-wise, so results are bitwise comparable);
the tree only relies on the call `gistnet(blocks (N, 32, D), level) -> (N, D)`.
"""

import os
import json
import struct

import numpy as np
import pytest
import torch

import nanochat.common
from conftest import each_flipped
from nanochat.common import UserError, json_checksum
from nanochat.megacontext import BLOCK_SIZE as K
from nanochat.megacontext.gistnet import GistNet
from nanochat.megacontext.tree import MegaContextTree, DiskRows, HEADER, HEADER_BYTES, GIST_BATCH

D = 16
VOCAB = 1000


def rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def make_embed(dim=D, seed=0):
    table = torch.randn(VOCAB, dim, generator=torch.Generator().manual_seed(seed))
    return lambda ids: rms(table[ids])  # (n,) -> (n, D)


class ToyGistNet:
    """Stand-in GistNet: a fixed random linear map of the block mean plus a per-level vector, row by
    row (elementwise products and sums only, so a row's value does not depend on the batch)."""

    def __init__(self, dim=D, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(dim, dim, generator=g) / dim ** 0.5  # (D, D)
        self.level_emb = torch.randn(8, dim, generator=g)  # (levels, D)
        self.calls = 0

    def __call__(self, blocks, level):
        assert blocks.dim() == 3 and blocks.shape[1] == K and blocks.dtype == torch.float32
        self.calls += 1
        m = blocks.mean(1)  # (N, D)
        return rms((m[:, :, None] * self.w).sum(1) + self.level_emb[level])  # (N, D)


def reference_gists(ids, gistnet, embed, max_level, dtype=torch.float16, dim=D):
    """Gists computed directly from the whole history, rounded to the storage dtype at each level."""
    x = embed(torch.as_tensor(ids, dtype=torch.long))  # (n, D)
    out = [None]
    for L in range(1, max_level + 1):
        n = len(x) // K
        if n == 0:
            break
        x = gistnet(x[:n * K].view(n, K, dim), L).to(dtype).float()  # (n, D)
        out.append(x)
    return out


def random_ids(n, seed=0):
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def assert_same_tree(a, b):
    assert a.num_tokens == b.num_tokens and len(a.levels) == len(b.levels)
    assert torch.equal(a.tokens(0, a.num_tokens), b.tokens(0, b.num_tokens))
    for L in range(1, len(a.levels)):
        n = a.num_gists(L)
        assert n == b.num_gists(L)
        assert torch.equal(a.gists(L, 0, n), b.gists(L, 0, n))
        assert [a.node(L, i).version for i in range(n)] == [b.node(L, i).version for i in range(n)]


def tree_for(tmp_path, mode, **kw):
    kw.setdefault("gistnet", ToyGistNet())
    kw.setdefault("embed_tokens", make_embed())
    return MegaContextTree(D, path=None if mode == "ram" else str(tmp_path / "tree"), **kw)


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_chunking_invariance_and_every_gist_computed(tmp_path, mode):
    ids = random_ids(40000)  # L1: 1250 gists, L2: 39, L3: 1
    gistnet, embed = ToyGistNet(), make_embed()
    whole = MegaContextTree(D, gistnet, embed)
    whole.ingest(ids)
    chunked = tree_for(tmp_path, mode, gistnet=gistnet, embed_tokens=embed)
    rng, s = np.random.default_rng(0), 0
    while s < len(ids):
        size = int(rng.choice([1, 31, 32, 33, 1000]))
        chunked.ingest(ids[s:s + size].tolist() if size == 33 else ids[s:s + size])
        s += size
    assert_same_tree(whole, chunked)
    ref = reference_gists(ids, gistnet, embed, max_level=5)
    assert len(whole.levels) == len(ref) == 4
    for L in range(1, 4):
        assert torch.equal(whole.gists(L, 0, whole.num_gists(L)), ref[L])  # no row left zero or stale


def test_one_token_at_a_time_equals_one_ingest():
    ids = random_ids(2 * K * K + 70, seed=3)
    gistnet, embed = ToyGistNet(), make_embed()
    a, b = MegaContextTree(D, gistnet, embed, max_level=2), MegaContextTree(D, gistnet, embed, max_level=2)
    a.ingest(ids)
    for t in ids.tolist():
        b.ingest([t])
    assert_same_tree(a, b)
    assert (a.num_gists(1), a.num_gists(2), len(a.levels)) == (66, 2, 3)


def test_many_blocks_at_once_gists_every_completed_node():
    gistnet, embed = ToyGistNet(), make_embed()
    tree = MegaContextTree(D, gistnet, embed)
    ids = random_ids(5 * K + 7 + 3000 * K, seed=4)
    tree.ingest(ids[:5 * K + 7])
    gistnet.calls = 0
    tree.ingest(ids[5 * K + 7:])  # 3000 blocks complete at once, and their LOD2/LOD3 parents
    # one call per GIST_BATCH-aligned cell a level's new nodes touch: LOD1 nodes 5..3004, LOD2 0..92, LOD3 0..1
    assert gistnet.calls == sum(len(range(a // GIST_BATCH, (b - 1) // GIST_BATCH + 1)) for a, b in [(5, 3005), (0, 93), (0, 2)])
    ref = reference_gists(ids, gistnet, embed, max_level=3)
    for L in (1, 2, 3):
        g = tree.gists(L, 0, tree.num_gists(L))
        assert len(g) == len(ids) // K ** L and torch.equal(g, ref[L])
        assert (g.abs().sum(1) > 0).all() and len(torch.unique(g, dim=0)) == len(g)


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_a_real_gistnet_gives_the_same_tree_bitwise_however_the_history_is_chunked(mode, tmp_path):
    """A transformer GistNet's batched matmuls round differently with the batch's shape: the tree runs
    it on one fixed cell shape, so the same history streamed block by block, in odd chunks, in random
    chunks or in one ingest gives the same bits (on mixed batch sizes, dozens of rows differed)."""
    dim = 128
    torch.manual_seed(0)
    gistnet = GistNet(dim, kind="transformer", pooling="query", n_layer=1, n_head=4, max_level=2).eval()
    for p in gistnet.parameters():  # as if trained: the init's zero projections would make it a plain mean
        p.data.normal_(0, 0.05)
    embed = make_embed(dim)
    ids = random_ids(70 * K + 11, seed=9)
    rng = np.random.default_rng(0)
    random_cuts = np.sort(rng.choice(np.arange(1, len(ids)), size=40, replace=False)).tolist()
    chunkings = {"one": [len(ids)], "block": list(range(K, len(ids), K)), "odd": list(range(37, len(ids), 37)),
                 "random": random_cuts}
    trees = []
    with torch.no_grad():
        for name, cuts in chunkings.items():
            path = None if mode == "ram" else str(tmp_path / name)
            tree = MegaContextTree(dim, gistnet, embed, max_level=2, path=path)
            for a, b in zip([0] + cuts, cuts + [len(ids)]):
                tree.ingest(ids[a:b])
            trees.append(tree)
    assert (trees[0].num_gists(1), trees[0].num_gists(2)) == (70, 2)
    for other in trees[1:]:
        assert_same_tree(trees[0], other)


def test_node_metadata():
    tree = MegaContextTree(D, ToyGistNet(), make_embed())
    tree.ingest(random_ids(2 * K * K + 40))  # 2088 tokens: 65 LOD1 nodes complete, 2 LOD2
    n = tree.node(1, 0)
    assert (n.level, n.index, n.start, n.end, n.parent, n.children, n.complete) == (1, 0, 0, 32, (2, 0), range(0, 32), True)
    assert tree.node(1, 64).parent is None  # LOD2 node 2 is not complete yet
    open_node = tree.node(1, 65)
    assert (open_node.start, open_node.end, open_node.complete, open_node.children) == (2080, 2112, False, range(2080, 2088))
    n2 = tree.node(2, 1)
    assert (n2.start, n2.end, n2.complete, n2.parent, n2.version) == (1024, 2048, True, None, 0)
    assert n2.children == [(1, j) for j in range(32, 64)]
    assert tree.node(2, 2).children == [(1, 64), (1, 65)] and not tree.node(2, 2).complete
    for level, index in [(1, 66), (1, -1), (0, 0), (3, 1)]:
        with pytest.raises(IndexError):
            tree.node(level, index)
    capped = MegaContextTree(D, ToyGistNet(), make_embed(), max_level=1)
    capped.ingest(random_ids(2 * K * K))
    assert capped.node(1, 0).parent is None and capped.num_gists(2) == 0
    with pytest.raises(IndexError):
        capped.node(2, 0)
    for L in (1, 2):  # every complete node has a gist and its children's spans tile its own
        for i in range(tree.num_gists(L)):
            node = tree.node(L, i)
            assert node.complete and node.end - node.start == K ** L
            if L == 2:
                assert [tree.node(*c).start for c in node.children] == list(range(node.start, node.end, K))


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_refresh_updates_gists_in_range_and_bumps_versions(tmp_path, mode):
    ids = random_ids(3 * K * K + 50, seed=5)
    embed = make_embed()
    tree = tree_for(tmp_path, mode, embed_tokens=embed)
    tree.ingest(ids)
    before = [None] + [tree.gists(L, 0, tree.num_gists(L)) for L in (1, 2)]
    tree.gistnet = new = ToyGistNet(seed=9)  # "after a training step"
    tree.refresh(1000, 1100)  # LOD1 nodes 31..34, LOD2 node 0 and 1
    g1 = tree.gists(1, 0, tree.num_gists(1))
    x = embed(ids[31 * K:35 * K]).view(4, K, D)
    assert torch.equal(g1[31:35], new(x, 1).half().float())
    assert torch.equal(g1[:31], before[1][:31]) and torch.equal(g1[35:], before[1][35:])
    assert [tree.node(1, i).version for i in range(29, 37)] == [0, 0, 1, 1, 1, 1, 0, 0]
    g2 = tree.gists(2, 0, 3)
    assert torch.equal(g2[:2], new(g1[:2 * K].view(2, K, D), 2).half().float())
    assert torch.equal(g2[2], before[2][2])
    assert [tree.node(2, i).version for i in range(3)] == [1, 1, 0]
    tree.refresh()
    ref = reference_gists(ids, new, embed, max_level=2)
    for L in (1, 2):
        assert torch.equal(tree.gists(L, 0, tree.num_gists(L)), ref[L])
    assert tree.node(1, 32).version == 2 and tree.node(1, 0).version == 1
    tree.save(str(tmp_path / "saved"))
    assert_same_tree(tree, MegaContextTree.load(str(tmp_path / "saved"), new, embed))
    if mode == "disk":  # refreshed rows and versions are durable after flush
        tree.close()
        assert_same_tree(tree, MegaContextTree.load(tree.path, new, embed))
    with pytest.raises(UserError, match="GistNet"):
        MegaContextTree(D, None, embed).refresh()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ram_save_load_round_trip_is_exact(tmp_path, dtype):
    gistnet, embed = ToyGistNet(), make_embed()
    tree = MegaContextTree(D, gistnet, embed, max_level=2, dtype=dtype, model_name="d20-mc")
    ids = random_ids(3 * K * K + 11, seed=6)
    tree.ingest(ids)
    tree.refresh(0, 64)
    ref = reference_gists(ids, gistnet, embed, max_level=2, dtype=dtype)
    assert torch.equal(tree.gists(1, 0, tree.num_gists(1)), ref[1]) and torch.equal(tree.gists(2, 0, 3), ref[2])
    path = str(tmp_path / "t")
    tree.save(path)
    sizes = {f: os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)}
    assert sizes["lod0.bin"] == HEADER_BYTES + 4 * len(ids)
    assert sizes["lod1.bin"] == HEADER_BYTES + 2 * D * (len(ids) // K)
    assert sizes["lod2.bin"] == HEADER_BYTES + 2 * D * 3
    with open(os.path.join(path, "lod1.bin"), "rb") as f:
        head = f.read(HEADER_BYTES)
    assert HEADER.unpack(head[:HEADER.size]) == (b"MCCT", 1, 1, K, D, 1 if dtype == torch.float16 else 2, len(ids) // K)
    assert head[HEADER.size:].rstrip(b"\0") == b"d20-mc"
    for in_ram in (False, True):
        back = MegaContextTree.load(path, gistnet, embed, in_ram=in_ram)
        assert_same_tree(tree, back)
        assert (back.dtype, back.max_level, back.model_name, back.path) == (dtype, 2, "d20-mc", None if in_ram else path)
        for L in (1, 2):  # bitwise: compare the stored bits, not just the float values
            assert np.array_equal(back.levels[L].read(0, back.num_gists(L)), tree.levels[L].read(0, tree.num_gists(L)))


def test_disk_mode_equals_ram_and_continues_after_reopen(tmp_path):
    gistnet, embed = ToyGistNet(), make_embed()
    ids = random_ids(5000, seed=7)
    ram = MegaContextTree(D, gistnet, embed)
    ram.ingest(ids)
    path = str(tmp_path / "disk")
    disk = MegaContextTree(D, gistnet, embed, path=path)
    disk.ingest(ids[:1234])
    disk.close()
    disk = MegaContextTree.load(path, gistnet, embed, dim=D)
    with pytest.raises(UserError, match="open for writing"):  # one writer per directory
        MegaContextTree.load(path, gistnet, embed)
    assert disk.num_tokens == 1234 and isinstance(disk.levels[0], DiskRows)
    disk.ingest(ids[1234:])
    assert_same_tree(ram, disk)
    disk.flush()
    assert os.path.getsize(os.path.join(path, "lod2.bin")) == HEADER_BYTES + 2 * D * 4
    disk.ingest(random_ids(3000, seed=8))  # never flushed: dropped on reopen, files cut back
    assert MegaContextTree.load(path, gistnet, embed, in_ram=True).num_tokens == 5000  # a reader sees the commit
    disk.close(flush=False)
    disk = MegaContextTree.load(path, gistnet, embed)
    assert_same_tree(ram, disk)
    assert os.path.getsize(os.path.join(path, "lod0.bin")) == HEADER_BYTES + 4 * 5000
    assert sorted(os.listdir(path)) == ["lod0.bin", "lod1.bin", "lod2.bin", "meta.json"]
    with pytest.raises(UserError, match="already holds"):
        MegaContextTree(D, gistnet, embed, path=path)


def test_saving_a_disk_tree_onto_its_own_directory_through_a_link_flushes_it(tmp_path):
    """save(<link to its own dir>) rewrote the files under the live tree: the next ingest died on its memmap."""
    gistnet, embed = ToyGistNet(), make_embed()
    ids = random_ids(3000, seed=11)
    ram = MegaContextTree(D, gistnet, embed)
    ram.ingest(ids)
    path = str(tmp_path / "disk")
    disk = MegaContextTree(D, gistnet, embed, path=path)
    disk.ingest(ids[:1000])
    os.symlink(path, tmp_path / "link")
    disk.save(str(tmp_path / "link"))
    disk.ingest(ids[1000:])
    assert_same_tree(ram, disk)
    disk.close()
    assert_same_tree(ram, MegaContextTree.load(path, gistnet, embed))


def test_tree_without_gistnet_catches_up_later(tmp_path):
    embed, ids = make_embed(), random_ids(3000, seed=10)
    path = str(tmp_path / "t")
    tree = MegaContextTree(D, None, embed, path=path)
    tree.ingest(ids[:2500])
    assert tree.num_gists(1) == 0 and tree.node(1, 3).complete
    tree.close()
    gistnet = ToyGistNet()
    tree = MegaContextTree.load(path, gistnet, embed)
    tree.ingest(ids[2500:])
    ref = reference_gists(ids, gistnet, embed, max_level=4)
    assert tree.num_gists(1) == 93 and torch.equal(tree.gists(1, 0, 93), ref[1]) and torch.equal(tree.gists(2, 0, 2), ref[2])


def corrupt(path, file, offset=None, data=None, cut=None):
    p = os.path.join(path, file)
    if cut is not None:
        os.truncate(p, os.path.getsize(p) - cut)
    else:
        with open(p, "r+b") as f:
            f.seek(offset)
            f.write(data)


def edit_meta(path, checksum=True, **changes):
    """Change meta.json's fields; checksum: recompute its checksum, as a tool rewriting it would."""
    p = os.path.join(path, "meta.json")
    meta = json.load(open(p))
    meta.update(changes)
    if checksum:
        meta["checksum"] = json_checksum(meta)
    json.dump(meta, open(p, "w"))


@pytest.mark.parametrize("damage, match", [
    (lambda p: corrupt(p, "lod1.bin", cut=3), "truncated"),
    (lambda p: corrupt(p, "lod0.bin", cut=4 * 100 + HEADER_BYTES), "truncated"),
    (lambda p: corrupt(p, "lod2.bin", 0, b"PK\x03\x04"), "not a MegaContext tree file"),
    (lambda p: corrupt(p, "lod1.bin", 4, struct.pack("<H", 7)), "format version 7"),
    (lambda p: corrupt(p, "lod1.bin", 12, struct.pack("<I", D + 1)), "dim"),
    (lambda p: corrupt(p, "lod1.bin", 8, struct.pack("<I", 64)), "block size"),
    (lambda p: corrupt(p, "lod1.bin", 16, b"\x02"), "dtype"),
    (lambda p: corrupt(p, "lod1.bin", 17, struct.pack("<Q", 3)), "truncated"),
    (lambda p: corrupt(p, "lod1.bin", 25, b"other"), "model name"),
    (lambda p: os.remove(os.path.join(p, "meta.json")), "no meta.json"),
    (lambda p: os.remove(os.path.join(p, "lod2.bin")), "missing"),
    (lambda p: corrupt(p, "meta.json", 0, b"}"), "unreadable"),
    (lambda p: edit_meta(p, format_version=2), "format version 2"),
    (lambda p: edit_meta(p, dtype="float32"), "unreadable"),
    (lambda p: edit_meta(p, counts=[100, 50, 0], page_crc32=[[0], [0], []]), "inconsistent counts"),
    (lambda p: edit_meta(p, checksum=False, versions={"1": [[0, 1, 1]]}), "does not match its checksum"),
    (lambda p: edit_meta(p, versions={"1": [[0, 99, 1]]}), "name levels or rows the tree does not have"),
    (lambda p: edit_meta(p, page_crc32=[[0], [0]]), "page_crc32 is not"),
    (lambda p: edit_meta(p, shards=2), "not a tree's metadata"),
    (lambda p: corrupt(p, "lod1.bin", HEADER_BYTES + 5, b"\x01"), "rows 0..63 do not match their checksum"),
])
def test_load_refuses_bad_files_with_one_line_error(tmp_path, damage, match):
    path = str(tmp_path / "t")
    tree = MegaContextTree(D, ToyGistNet(), make_embed(), model_name="m")
    tree.ingest(random_ids(2 * K * K + 5))
    tree.save(path)
    damage(path)
    with pytest.raises(UserError, match=match) as e:  # a disk tree's rows are checked as they are read: read them all
        MegaContextTree.load(path, ToyGistNet(), make_embed()).check_rows(VOCAB, "the tree")
    assert "\n" not in str(e.value)


def test_load_refuses_a_different_dim(tmp_path):
    path = str(tmp_path / "t")
    MegaContextTree(D, None, make_embed()).save(path)
    with pytest.raises(UserError, match="dim 16; expected block size 32, dim 8"):
        MegaContextTree.load(path, None, make_embed(), dim=8)


def test_meta_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "t")
    tree = MegaContextTree(D, ToyGistNet(), make_embed(), path=path)
    tree.ingest(random_ids(100))
    tree.flush()
    committed = open(os.path.join(path, "meta.json")).read()

    def dump_half_then_crash(obj, f, **kw):
        f.write('{"format_version": ')
        raise OSError("disk full")
    monkeypatch.setattr(nanochat.common.json, "dump", dump_half_then_crash)
    tree.ingest(random_ids(100, seed=1))
    with pytest.raises(OSError):
        tree.flush()
    monkeypatch.undo()
    tree.close(flush=False)
    assert open(os.path.join(path, "meta.json")).read() == committed
    assert sorted(os.listdir(path)) == ["lod0.bin", "lod1.bin", "meta.json"]  # no temp file left
    assert MegaContextTree.load(path, ToyGistNet(), make_embed()).num_tokens == 100


def test_bad_arguments_are_refused():
    tree = MegaContextTree(D, ToyGistNet(), make_embed())
    for bad in ([[1, 2]], [-1, 3], [0.5, 2.0], np.array([2 ** 32], dtype=np.int64)):
        with pytest.raises(UserError):
            tree.ingest(bad)
    tree.ingest([])
    assert tree.num_tokens == 0 and tree.gists(1, 0, 0).shape == (0, D)
    with pytest.raises(UserError, match="float16 or torch.bfloat16"):
        MegaContextTree(D, None, make_embed(), dtype=torch.float32)


def test_two_million_token_disk_tree_lives_on_disk(tmp_path):
    dim, n = 8, 2_000_000
    gistnet, embed = ToyGistNet(dim), make_embed(dim)
    path = str(tmp_path / "big")
    tree = MegaContextTree(dim, gistnet, embed, max_level=3, path=path)
    ids = np.random.default_rng(0).integers(0, VOCAB, n, dtype=np.int64)
    for s in range(0, n, 700_001):
        tree.ingest(ids[s:s + 700_001])
    tree.flush()
    counts = [n, n // K, n // K ** 2, n // K ** 3]
    assert [tree.num_tokens] + [tree.num_gists(L) for L in (1, 2, 3)] == counts == [2_000_000, 62_500, 1953, 61]
    for L, c in enumerate(counts):
        assert isinstance(tree.levels[L], DiskRows)
        assert os.path.getsize(os.path.join(path, f"lod{L}.bin")) == HEADER_BYTES + c * (4 if L == 0 else 2 * dim)
    assert json.load(open(os.path.join(path, "meta.json")))["counts"] == counts
    tree.close()
    tree = MegaContextTree.load(path, gistnet, embed)
    rng = np.random.default_rng(1)
    for i in rng.integers(0, counts[1], 20).tolist():  # random LOD1 rows: from their tokens
        x = embed(torch.from_numpy(ids[i * K:(i + 1) * K])).view(1, K, dim)
        assert torch.equal(tree.gist(1, i), gistnet(x, 1).half().float()[0])
    for i in rng.integers(0, counts[2], 5).tolist():  # random LOD2 rows: from the stored LOD1 rows
        assert torch.equal(tree.gist(2, i), gistnet(tree.gists(1, i * K, (i + 1) * K)[None], 2).half().float()[0])
    assert torch.equal(tree.tokens(n - 5, n), torch.from_numpy(ids[-5:]))


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_real_gistnet_chunking_invariance(kind):
    from nanochat.megacontext.gistnet import GistNet
    torch.manual_seed(0)
    gistnet, embed = GistNet(D, kind=kind, n_head=2, max_level=2), make_embed()
    for p in gistnet.parameters():  # move away from the mean-pooling init so the network matters
        p.data += 0.1 * torch.randn_like(p)
    ids = random_ids(2 * K * K + 100, seed=11)
    whole = MegaContextTree(D, gistnet, embed)
    whole.ingest(ids)
    assert whole.max_level == 2 and len(whole.levels) == 3
    chunked = MegaContextTree(D, gistnet, embed)
    for s in range(0, len(ids), 33):
        chunked.ingest(ids[s:s + 33])
    for L in (1, 2):
        a, b = whole.gists(L, 0, whole.num_gists(L)), chunked.gists(L, 0, chunked.num_gists(L))
        assert torch.allclose(a, b, atol=2e-3, rtol=0), (a - b).abs().max()  # one fp16 ulp, if a matmul rounds apart
    with pytest.raises(UserError, match="cannot serve"):
        MegaContextTree(D, gistnet, embed, max_level=3)


# -----------------------------------------------------------------------------
# property: any token stream, any chunking, RAM or disk -> the same tree

from hypothesis import given, settings, strategies as st, HealthCheck


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 3000), cuts=st.lists(st.integers(1, 3000), max_size=12), seed=st.integers(0, 99), disk=st.booleans())
def test_property_ingest_is_chunking_invariant(tmp_path_factory, n, cuts, seed, disk):
    ids = torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))
    gistnet, embed = ToyGistNet(), make_embed()
    whole = MegaContextTree(D, gistnet, embed, max_level=3)
    whole.ingest(ids)
    path = str(tmp_path_factory.mktemp("tree")) + "/t" if disk else None
    chunked = MegaContextTree(D, gistnet, embed, max_level=3, path=path)
    bounds = sorted({0, n, *[c % (n + 1) for c in cuts]})
    for a, b in zip(bounds, bounds[1:]):
        chunked.ingest(ids[a:b])
    assert chunked.num_tokens == n and torch.equal(chunked.tokens(0, n), ids)
    for L in range(1, 4):
        assert chunked.num_gists(L) == whole.num_gists(L) == n // K ** L
        assert torch.equal(chunked.gists(L, 0, n // K ** L), whole.gists(L, 0, n // K ** L))


def test_load_refuses_a_tree_built_for_another_model(tmp_path):
    path = str(tmp_path / "t")
    tree = MegaContextTree(D, ToyGistNet(), make_embed(), path=path, model_name="d12")
    tree.ingest(random_ids(100))
    tree.close()
    with pytest.raises(UserError, match="built for model 'd12', not 'd20'"):
        MegaContextTree.load(path, ToyGistNet(), make_embed(), model_name="d20")
    assert MegaContextTree.load(path, ToyGistNet(), make_embed(), model_name="d12").num_tokens == 100


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_rewrite_edits_tokens_in_place_and_the_gists_over_them(tmp_path, mode):
    ids = random_ids(2 * K * K + 40, seed=6)
    embed = make_embed()
    tree = tree_for(tmp_path, mode, embed_tokens=embed)
    tree.ingest(ids)
    new_ids = ids.clone()
    new_ids[1030:1035] = torch.tensor([1, 2, 3, 4, 5])
    tree.rewrite(1030, [1, 2, 3, 4, 5])
    assert torch.equal(tree.tokens(0, tree.num_tokens), new_ids) and tree.num_tokens == len(ids)
    ref = reference_gists(new_ids, tree.gistnet, embed, max_level=2)  # as if the edited text had been ingested
    for L in (1, 2):
        assert torch.equal(tree.gists(L, 0, tree.num_gists(L)), ref[L])
    assert tree.node(1, 32).version == 1 and tree.node(1, 31).version == 0 and tree.node(2, 1).version == 1
    with pytest.raises(UserError, match="outside the history"):
        tree.rewrite(len(ids) - 2, [1, 2, 3])
    with pytest.raises(UserError, match="non-empty"):
        tree.rewrite(0, [])


def test_the_writer_opening_a_tree_removes_what_a_killed_write_left(tmp_path, capsys):
    gistnet, embed = ToyGistNet(), make_embed()
    path = str(tmp_path / "t")
    tree = MegaContextTree(D, gistnet, embed, path=path)
    tree.ingest(random_ids(3 * K + 5))
    tree.flush()
    tree.close()
    stale = os.path.join(path, "meta.json.k3x_9q0z.tmp")  # the name atomic_path gives its temporary
    open(stale, "w").write('{"half": ')
    kept = os.path.join(path, "notes.tmp")  # not one of ours: left alone
    open(kept, "w").write("mine")
    MegaContextTree.load(path, gistnet, embed, in_ram=True).close()  # a reader: touches nothing
    assert os.path.exists(stale)
    writer = MegaContextTree.load(path, gistnet, embed)  # a live writer, its save in flight: the temp is its own
    open(stale, "w").write('{"half": ')
    with pytest.raises(UserError, match="open for writing"):  # a second opener is refused before it touches anything
        MegaContextTree.load(path, gistnet, embed)
    assert os.path.exists(stale)  # it was removed before the refusal, and the writer's save then failed
    writer.close()
    open(stale, "w").write('{"half": ')  # as a killed writer leaves it
    again = MegaContextTree.load(path, gistnet, embed)  # the writer
    assert not os.path.exists(stale) and os.path.exists(kept)
    assert "removed 1 partial file(s) of an interrupted write" in capsys.readouterr().out
    assert again.num_tokens == 3 * K + 5


@pytest.mark.parametrize("in_ram", [False, True])
def test_a_tokens_only_tree_max_level_0_loads_back(tmp_path, in_ram):
    """The constructor takes max_level 0 (tokens, no gists); load refused its own metadata."""
    path = str(tmp_path / "t")
    tree = MegaContextTree(D, ToyGistNet(), make_embed(), max_level=0, path=path)
    ids = random_ids(3 * K + 5)
    tree.ingest(ids)
    tree.close()
    again = MegaContextTree.load(path, ToyGistNet(), make_embed(), in_ram=in_ram)
    assert again.max_level == 0 and again.num_gists(1) == 0 and again.tokens(0, len(ids)).tolist() == ids.tolist()


def test_a_writer_killed_between_cutting_uncommitted_rows_and_rewriting_the_header_leaves_a_tree_that_opens(tmp_path):
    """Opening a disk tree cuts the rows meta.json never committed, then rewrites the header's count: a
    kill in between left the header counting rows the file no longer holds, and every later load refused
    the tree although each committed row was intact."""
    path = str(tmp_path / "t")
    tree = MegaContextTree(D, ToyGistNet(), make_embed())
    ids = random_ids(3 * K + 5)
    tree.ingest(ids)
    tree.save(path)
    counts = json.load(open(os.path.join(path, "meta.json")))["counts"]
    corrupt(path, "lod0.bin", 17, struct.pack("<Q", counts[0] + 2 * K))  # the header of the rows that were cut
    for in_ram in (True, False):
        again = MegaContextTree.load(path, ToyGistNet(), make_embed(), in_ram=in_ram)
        assert again.num_tokens == len(ids) and again.tokens(0, len(ids)).tolist() == ids.tolist()
        again.close()
    with open(os.path.join(path, "lod0.bin"), "rb") as f:  # the writer put the header right
        assert struct.unpack("<Q", f.read(HEADER_BYTES)[17:25])[0] == counts[0]


FUZZ_VALUES = [None, True, -1, 0, 1.5, 10 ** 18, "2", "", [], [1], {}, {"0": [[0, 1, 1]]}]


def saved_tree(path):
    tree = MegaContextTree(D, ToyGistNet(), make_embed(), max_level=2, path=str(path))
    tree.ingest(random_ids(2 * K * K + 3 * K + 5, seed=11))
    tree.flush()
    tree.close()
    return tree


def open_or_refuse(path, in_ram=False):
    """The only outcomes allowed for a damaged tree, opened and every row read: a one-line UserError,
    or a tree that reads back exactly as saved (the damage was outside what meta.json commits) ->
    "refused" / "same" / "prefix" (an older commit's rows)."""
    try:
        tree = MegaContextTree.load(str(path), ToyGistNet(), make_embed(), in_ram=in_ram).check_rows(VOCAB, str(path))
    except UserError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return "refused"
    good = MegaContextTree.load(str(path) + "_good", ToyGistNet(), make_embed(), in_ram=True)
    if tree.num_tokens < good.num_tokens or any(tree.num_gists(L) < good.num_gists(L) for L in (1, 2)):
        outcome = "prefix"  # counts below the files': the state before a killed save, read as such
        n = tree.num_tokens
        assert torch.equal(tree.tokens(0, n), good.tokens(0, n))
        for L in range(1, len(tree.levels)):
            assert torch.equal(tree.gists(L, 0, tree.num_gists(L)), good.gists(L, 0, tree.num_gists(L)))
    else:
        outcome = "same"
        assert_same_tree(tree, good)
    tree.close()
    return outcome


def test_fuzz_tree_meta_every_field_of_every_type_is_refused_in_one_line_or_harmless(tmp_path):
    import shutil
    base = tmp_path / "t"
    saved_tree(base)
    shutil.copytree(base, str(base) + "_good")
    meta = json.loads((base / "meta.json").read_text())
    outcomes = {}
    for field in list(meta):
        for value in FUZZ_VALUES + ["<missing>"]:
            bad = dict(meta)
            if value == "<missing>":
                bad.pop(field)
            else:
                bad[field] = value
            if bad == meta:
                continue
            (base / "meta.json").write_text(json.dumps(bad))
            assert open_or_refuse(base) == "refused", (field, value)  # the checksum no longer matches
            if field == "checksum":
                continue
            bad["checksum"] = json_checksum(bad)  # as a tool rewriting meta.json would: then every field is checked
            (base / "meta.json").write_text(json.dumps(bad))
            outcomes[field, repr(value)] = open_or_refuse(base)
    (base / "meta.json").write_text(json.dumps(meta))
    # what may load: another model name, no depth limit, a meta.json without page checksums (as written
    # before they existed: read unverified; the rows here are intact, so it reads the same), no version
    # runs (this tree's versions are all 0: the same)
    accepted = {k for k, v in outcomes.items() if v != "refused"}
    assert accepted <= {("max_level", "None"), ("page_crc32", "'<missing>'"), ("versions", "{}")} | {(f, v) for f, v in accepted if f == "model_name"}, sorted(accepted)
    assert ("counts", "[]") not in accepted and ("page_crc32", "[]") not in accepted
    for text in ["", "{", "[" * 50_000, "null", '"meta"', "\xff"]:
        (base / "meta.json").write_text(text, encoding="latin-1")
        assert open_or_refuse(base) == "refused"


def test_fuzz_tree_level_files_truncated_or_with_flipped_header_bytes_are_refused(tmp_path):
    import shutil
    base = tmp_path / "t"
    saved_tree(base)
    shutil.copytree(base, str(base) + "_good")
    rng = np.random.default_rng(0)
    for L in range(3):
        file = base / f"lod{L}.bin"
        data = file.read_bytes()
        cuts = sorted({0, 3, 4, 6, 8, 12, 16, 17, 25, HEADER.size, HEADER_BYTES - 1, HEADER_BYTES, len(data) - 1}
                      | set(rng.integers(0, len(data), 12).tolist()))
        for cut in cuts:
            file.write_bytes(data[:cut])
            assert open_or_refuse(base) == "refused", f"lod{L}.bin cut at {cut}"
        file.write_bytes(data)


@pytest.mark.parametrize("in_ram", [False, True])
def test_fuzz_a_flipped_byte_anywhere_in_a_level_file_is_refused(tmp_path, in_ram):
    """Header bytes are checked against meta.json, rows against their page's crc32: every byte of the
    headers and of LOD2, and 60 random bytes of each other body, flipped -> a one-line error. The one
    exception is the header's row count raised (17..24): meta.json commits the rows, the file still
    holds them all, so the tree opens as saved (a writer rewrites the count)."""
    import shutil
    base = tmp_path / "t"
    saved_tree(base)
    shutil.copytree(base, str(base) + "_good")
    rng = np.random.default_rng(1)
    for L in range(3):
        file = base / f"lod{L}.bin"
        size = file.stat().st_size
        body = range(HEADER_BYTES, size) if L == 2 else rng.integers(HEADER_BYTES, size, 60).tolist()
        for offset in each_flipped(file, list(range(HEADER_BYTES)) + list(body)):
            count_raised = 17 <= offset < 25 and (file.read_bytes()[offset] >> (offset % 8)) & 1
            assert open_or_refuse(base, in_ram) == ("same" if count_raised else "refused"), f"lod{L}.bin byte {offset}"
    assert open_or_refuse(base, in_ram) == "same"


def flip(path, file, offset):
    with open(os.path.join(path, file), "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def test_disk_rows_are_checked_per_page_as_they_are_read_and_before_they_are_written(tmp_path, monkeypatch):
    import nanochat.megacontext.tree as tree_module
    monkeypatch.setattr(tree_module, "PAGE_BYTES", 64)  # 16 tokens or 2 gists (D 16, fp16) per page
    path = str(tmp_path / "t")
    tree = MegaContextTree(D, ToyGistNet(), make_embed(), max_level=2, path=path)
    ids = random_ids(3 * K * K + 7)
    tree.ingest(ids)
    tree.close()
    assert [len(c) for c in json.load(open(os.path.join(path, "meta.json")))["page_crc32"]] == [-(-len(ids) // 16), 48, 2]
    flip(path, "lod0.bin", HEADER_BYTES + 4 * 40)  # token 40: page 2 of LOD0
    flip(path, "lod1.bin", HEADER_BYTES + 2 * D * 9)  # gist 9: page 4 of LOD1
    disk = MegaContextTree.load(path, ToyGistNet(), make_embed())  # opening reads no row
    assert torch.equal(disk.tokens(0, 32), ids[:32]) and torch.equal(disk.tokens(48, 100), ids[48:100])  # other pages
    with pytest.raises(UserError, match=r"lod0.bin: rows 32..47 do not match their checksum"):
        disk.tokens(47, 49)
    assert disk.gists(1, 10, 48).shape == (38, D)
    with pytest.raises(UserError, match=r"lod1.bin: rows 8..9 do not match their checksum"):
        disk.gist(1, 9)
    with pytest.raises(UserError, match=r"lod0.bin: rows 32..47"):  # a write never launders a damaged page
        disk.rewrite(33, [5])
    disk.close(flush=False)
    with pytest.raises(UserError, match=r"lod0.bin: rows 32..47"):  # a RAM copy checks every page at load
        MegaContextTree.load(path, ToyGistNet(), make_embed(), in_ram=True)


@pytest.mark.parametrize("mode", ["ram", "disk"])
def test_page_checksums_follow_appends_rewrites_and_refreshes(tmp_path, monkeypatch, mode):
    import nanochat.megacontext.tree as tree_module
    monkeypatch.setattr(tree_module, "PAGE_BYTES", 64)
    path = str(tmp_path / "t")
    tree = MegaContextTree(D, ToyGistNet(), make_embed(), max_level=2, path=path if mode == "disk" else None)
    for n in [5, 100, 1, K * K, 2 * K + 3]:  # appends that end inside pages and across them
        tree.ingest(random_ids(n, seed=n))
        tree.save(str(tmp_path / "copy"))
        again = MegaContextTree.load(str(tmp_path / "copy"), ToyGistNet(), make_embed(), in_ram=True)  # checks every page
        assert_same_tree(again, tree)
    tree.rewrite(40, random_ids(70, seed=3))  # rows in the middle of levels 0, 1 and 2
    tree.refresh(0, 64)
    tree.save(str(tmp_path / "copy"))
    assert_same_tree(MegaContextTree.load(str(tmp_path / "copy"), ToyGistNet(), make_embed(), in_ram=True), tree)
    if mode == "disk":
        tree.close()
        reopened = MegaContextTree.load(path, ToyGistNet(), make_embed()).check_rows(VOCAB, path)
        reopened.ingest(random_ids(K + 1, seed=9))  # continues inside the last, partly filled pages
        reopened.close()
        MegaContextTree.load(path, ToyGistNet(), make_embed(), in_ram=True)
