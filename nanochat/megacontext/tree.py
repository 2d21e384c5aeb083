"""
MegaContextTree: the whole history as LOD0 tokens plus LOD1, LOD2, ... gists, in RAM or on disk.

Level 0 holds the token ids. A level-L node i (L >= 1) covers tokens [i * K**L, (i+1) * K**L),
K = BLOCK_SIZE = 32; its gist is `gistnet(children, L)` over its 32 children: token embeddings
(L = 1) or the stored level-(L-1) gists (L >= 2). Only complete nodes get gists (the open tail
stays LOD0), and every gist has a version: 0 when made, +1 each time `refresh` recomputes it.

Ingest appends tokens, then bottom-up computes the gist of *every* node completed since the last
call (rows num_gists(L) .. num_tokens // K**L). The tree is bitwise the same however the history
was chunked (one big ingest, 1-token ingests, RAM or disk): children are always read back from
storage (already rounded to fp16/bf16), and GistNet always runs on one shape, a cell of GIST_BATCH
nodes aligned to multiples of GIST_BATCH with node i in row i % GIST_BATCH, the rows not asked for
zero. A CPU matmul's result for a row depends on the batch's shape and the row's place in it (its
kernels and blocking), not on the other rows' values, so a gist never depends on what completed
beside it. The price: a streamed block runs GistNet on GIST_BATCH rows (~2x the time of one row at
D 128, ~4x at 768 on a 2-core CPU), a bulk ingest ~1.1-1.6x the widest batches. Without a GistNet
the tree holds tokens only; the first ingest with one computes every missing gist.

Storage: per level a table of rows, uint32 token ids or D-wide gists as raw fp16/bf16 bits
(uint16). RAM mode: growable numpy arrays. Disk mode (path=dir) and `save` use this layout, written
with pwrite and read through numpy.memmap, so a 10M-token history costs almost no RSS:
  dir/lod{L}.bin  64-byte little-endian header:
                    magic b"MCCT" | format version u16 | level u16 | block size u32 | dim u32 |
                    dtype code u8 (0 = uint32 tokens, 1 = fp16, 2 = bf16) | entry count u64 |
                    model name, utf-8, zero-padded to byte 64
                  then `count` rows: uint32 (LOD0) or dim x uint16 (gists), nothing else
  dir/meta.json   format version, block size, dim, dtype, max_level, model name, row count of
                  every level, gist versions as runs [i0, i1, version] (version-0 runs left out),
                  page_crc32 (per level, the crc32 of each page: PAGE_BYTES of rows, the last page
                  its committed rows) and checksum (sha256 of the rest of meta.json)
Durability: ingest writes rows past the committed end; `flush` fsyncs them, writes each header's
count, then replaces meta.json atomically. meta.json is the commit record: load takes the counts
from it and cuts off rows past them (an ingest never flushed). A file shorter than its count, a
foreign file, another format version, or a dim / block size / dtype that disagrees with meta.json
is refused with a one-line UserError.
Integrity: a changed byte anywhere is refused, not used. The header's every byte is checked against
meta.json, meta.json against its checksum, and each page of rows against its crc32: a RAM copy all
at load (it reads every row anyway), a disk tree lazily, each page the first time a row of it is
read or written (a 1 MiB crc32, ~0.5 ms). Pages written since are trusted and their crc32 redone at
the next commit. A meta.json without checksums (written before they existed) is read unverified.
Appends are safe against a kill (rows past the commit are cut off); rewrite / refresh change rows
in place, so a kill before their flush leaves pages that fail their crc32: such a tree is refused
(rebuild it), never read half old and half new.
"""

import os
import json
import zlib
import fcntl
import weakref
import struct
from dataclasses import dataclass

import numpy as np
import torch

from nanochat.common import UserError, atomic_path, atomic_write_json, json_checksum, report_stale_temps
from nanochat.megacontext import BLOCK_SIZE
from nanochat.megacontext.working_context import OneMemory

K = BLOCK_SIZE
FORMAT_VERSION = 1
MAGIC = b"MCCT"
HEADER = struct.Struct("<4sHHIIBQ")  # magic, version, level, block size, dim, dtype code, count: 25 bytes
HEADER_BYTES = 64                    # the rest of the 64 bytes is the model name
NAME_BYTES = HEADER_BYTES - HEADER.size
DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2}  # code 0 = uint32 tokens (LOD0)
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
INGEST_BATCH = 1 << 20  # tokens appended per step of a long ingest (bounds the working memory)
GIST_BATCH = 8          # nodes per GistNet call, always (a fixed shape keeps ingest bitwise chunking-invariant)
COPY_ROWS = 1 << 16     # rows per step when copying a level (save, load into RAM)
PAGE_BYTES = 1 << 20    # rows are checksummed (crc32) per page of this many bytes
META_FIELDS = ("format_version", "block_size", "dim", "dtype", "max_level", "model_name", "counts", "versions",
               "page_crc32", "checksum")


@dataclass(frozen=True)
class Node:
    level: int
    index: int
    start: int        # first token covered
    end: int          # one past the last token covered: start + K**level, even while incomplete
    parent: tuple     # (level + 1, index // K), or None while the parent is incomplete or above max_level
    children: object  # level 1: range of token positions; level >= 2: [(level - 1, j), ...]; only those started
    version: int      # gist version (0 if there is no gist yet)
    complete: bool    # all K**level tokens ingested


def header_bytes(level, dim, code, count, model_name):
    name = model_name.encode("utf-8")[:NAME_BYTES]
    return HEADER.pack(MAGIC, FORMAT_VERSION, level, K, dim, code, count) + name.ljust(NAME_BYTES, b"\0")


def to_bits(x, dtype):
    """float tensor (n, D) -> the raw fp16/bf16 bits as numpy uint16 (n, D)."""
    return x.detach().to("cpu", dtype).contiguous().view(torch.int16).numpy().view(np.uint16)


def from_bits(bits, dtype):
    """numpy uint16 (n, D) of fp16/bf16 bits -> float32 tensor (n, D)."""
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(dtype).float()


def row_bytes(level, dim):
    """Bytes of one stored row: an int32 token id at LOD0, dim fp16/bf16 values for a gist."""
    return 4 if level == 0 else 2 * dim


def page_rows(nbytes):
    return max(1, PAGE_BYTES // nbytes)


class Pages:
    """The page checksums of one level's rows (shared by RamRows and DiskRows): crcs[p] is the crc32
    of rows [p * page_rows, min((p + 1) * page_rows, n)) as last committed. A page is verified before
    its first read or write here; once verified or written it is trusted, and a written page gets its
    crc32 recomputed by the next page_crcs()."""

    def init_pages(self, np_dtype, width, name):
        self.np_dtype, self.shape, self.name = np.dtype(np_dtype), () if width is None else (width,), name
        self.row_bytes = self.np_dtype.itemsize * (width or 1)
        self.page_rows = page_rows(self.row_bytes)
        self.set_pages([])

    def num_pages(self):
        return -(-self.n // self.page_rows)

    def set_pages(self, crcs):
        """The committed crc32s of the rows held now (None: unknown, an older file: trust every page)."""
        self.crcs = [0] * self.num_pages() if crcs is None else list(crcs)
        self.trusted = set(range(self.num_pages())) if crcs is None else set()
        self.dirty = set(self.trusted)

    def verify(self, i0, i1):
        """Check every page holding rows in [i0, i1) (the page [i0 lands in, for an append) once."""
        for p in range(i0 // self.page_rows, min(-(-max(i1, i0 + 1) // self.page_rows), self.num_pages())):
            if p not in self.trusted:
                a, b = p * self.page_rows, min((p + 1) * self.page_rows, self.n)
                if zlib.crc32(self.raw(a, b)) != self.crcs[p]:
                    raise UserError(f"{self.name}: rows {a}..{b - 1} do not match their checksum (changed or damaged since they were saved)")
                self.trusted.add(p)

    def written(self, i0, i1):
        pages = range(i0 // self.page_rows, -(-i1 // self.page_rows))
        self.trusted.update(pages)
        self.dirty.update(pages)

    def page_crcs(self):
        """The crc32 of every page as the rows are now (recomputes the pages written since the last call)."""
        self.crcs = self.crcs[:self.num_pages()] + [0] * (self.num_pages() - len(self.crcs))
        for p in sorted(p for p in self.dirty if p < self.num_pages()):
            self.crcs[p] = zlib.crc32(self.raw(p * self.page_rows, min((p + 1) * self.page_rows, self.n)))
        self.dirty.clear()
        return list(self.crcs)


class RamRows(Pages):
    """Rows of one level in a growable numpy array (capacity doubles). name: where errors point."""

    def __init__(self, np_dtype, width, name="the tree in RAM"):
        self.n = 0
        self.init_pages(np_dtype, width, name)
        self.buf = np.empty((0,) + self.shape, np_dtype)

    def append(self, rows):
        need = self.n + len(rows)
        if need > len(self.buf):
            buf = np.empty((max(need, 2 * len(self.buf), 256),) + self.shape, self.buf.dtype)
            buf[:self.n] = self.buf[:self.n]
            self.buf = buf
        self.write(self.n, rows)

    def write(self, i0, rows):
        self.verify(i0, i0 + len(rows))
        self.buf[i0:i0 + len(rows)] = rows
        self.n = max(self.n, i0 + len(rows))
        self.written(i0, i0 + len(rows))

    def read(self, i0, i1):
        self.verify(i0, i1)
        return self.buf[i0:i1].copy()

    def raw(self, a, b):
        return self.buf[a:b]  # contiguous: crc32 reads its buffer


class DiskRows(Pages):
    """Rows of one level in a lod{L}.bin file: pwrite to write, numpy.memmap (read-only) to read."""

    def __init__(self, path, np_dtype, width, n, crcs=None):
        self.path, self.n = path, n
        self.init_pages(np_dtype, width, path)
        self.file = open(path, "r+b")  # closes itself when the tree goes away
        self.fd = self.file.fileno()
        self.mm = None  # remapped when rows were appended past its end
        if os.fstat(self.fd).st_size != HEADER_BYTES + n * self.row_bytes:  # drop rows never committed
            os.ftruncate(self.fd, HEADER_BYTES + n * self.row_bytes)
        self.set_pages(crcs)
        self.flush()

    def write(self, i0, rows):
        self.verify(i0, i0 + len(rows))
        data = memoryview(np.ascontiguousarray(rows, self.np_dtype)).cast("B")
        offset = HEADER_BYTES + i0 * self.row_bytes
        while len(data):  # pwrite may write less than asked
            done = os.pwrite(self.fd, data, offset)
            data, offset = data[done:], offset + done
        self.n = max(self.n, i0 + len(rows))
        self.written(i0, i0 + len(rows))

    def append(self, rows):
        self.write(self.n, rows)

    def read(self, i0, i1):
        if i1 <= i0:
            return np.empty((0,) + self.shape, self.np_dtype)
        self.verify(i0, i1)
        if self.mm is None or len(self.mm) < i1:
            self.mm = np.memmap(self.path, self.np_dtype, "r", HEADER_BYTES, (self.n,) + self.shape)
        return np.array(self.mm[i0:i1])

    def raw(self, a, b):
        return os.pread(self.fd, (b - a) * self.row_bytes, HEADER_BYTES + a * self.row_bytes)  # short if truncated: no match

    def flush(self):
        """Data first, then the header count that exposes it."""
        os.fsync(self.fd)
        os.pwrite(self.fd, struct.pack("<Q", self.n), HEADER.size - 8)
        os.fsync(self.fd)


def check_level_file(path, level, dim, code, model_name, count):
    """Validate lod{level}.bin against meta.json; raise a one-line UserError if it does not fit."""
    if not os.path.exists(path):
        raise UserError(f"{path}: missing (the tree directory is incomplete)")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) >= 4 and head[:4] != MAGIC:
        raise UserError(f"{path}: not a MegaContext tree file (magic {head[:4]!r}, expected {MAGIC!r})")
    if len(head) < HEADER_BYTES:
        raise UserError(f"{path}: truncated ({size} bytes, shorter than the {HEADER_BYTES}-byte header)")
    _, version, lvl, block, d, c, n = HEADER.unpack(head[:HEADER.size])
    name, want_name = head[HEADER.size:].rstrip(b"\0"), model_name.encode("utf-8")[:NAME_BYTES]
    for what, got, want in [("format version", version, FORMAT_VERSION), ("level", lvl, level), ("block size", block, K),
                            ("dim", d, dim), ("dtype code", c, code), ("model name", name, want_name)]:
        if got != want:
            raise UserError(f"{path}: {what} {got} does not match the expected {what} {want}")
    nbytes = row_bytes(level, dim)
    # meta.json's count is the commit record: the header may count more rows (written before the commit, or a
    # writer killed between cutting uncommitted rows and rewriting the header); the committed rows must be there
    if n < count or size < HEADER_BYTES + count * nbytes:
        held = (size - HEADER_BYTES) // nbytes
        raise UserError(f"{path}: truncated (meta.json says {count} rows, its header {n}, it holds {held})")


def version_runs(v):
    """uint32 versions (n,) -> [[i0, i1, version], ...] for the runs with version != 0."""
    cuts = [0] + (np.flatnonzero(np.diff(v)) + 1).tolist() + [len(v)]
    return [[a, b, int(v[a])] for a, b in zip(cuts[:-1], cuts[1:]) if b > a and v[a] != 0]


class MegaContextTree(OneMemory):
    """The history of one stream. dim: embedding width D; gistnet: (N, 32, D), level -> (N, D), or
    None (tokens only); embed_tokens: ids (n,) -> (n, D); max_level: deepest gist level (default:
    the GistNet's); path: None = RAM, else a directory for disk mode (one writer at a time);
    dtype: gist storage, fp16 or bf16; model_name: recorded in the files, checked by load."""

    def __init__(self, dim, gistnet, embed_tokens, max_level=None, path=None, dtype=torch.float16, model_name="", device="cpu"):
        max_level = getattr(gistnet, "max_level", None) if max_level is None else max_level  # a GistNet's depth
        if path is not None and os.path.exists(os.path.join(path, "meta.json")):
            raise UserError(f"{path} already holds a MegaContext tree: open it with MegaContextTree.load")
        self._setup(dim, gistnet, embed_tokens, max_level, path, dtype, model_name, device)
        self._add_level()
        self.flush()

    def _setup(self, dim, gistnet, embed_tokens, max_level, path, dtype, model_name, device):
        if dtype not in DTYPE_CODES:
            raise UserError(f"gist storage dtype must be torch.float16 or torch.bfloat16, got {dtype}")
        if max_level is not None and max_level < 0:
            raise UserError(f"max_level must be >= 0 or None, got {max_level}")
        depth, width = getattr(gistnet, "max_level", None), getattr(gistnet, "dim", dim)
        if width != dim or (depth is not None and (max_level is None or max_level > depth)):
            raise UserError(f"the GistNet (dim {width}, levels 1..{depth}) cannot serve a tree of dim {dim}, max_level {max_level}")
        self.dim, self.gistnet, self.embed_tokens, self.max_level = dim, gistnet, embed_tokens, max_level
        self.device = torch.device(device)  # where embed_tokens and the GistNet run (their weights' device)
        self.path, self.dtype, self.model_name = path, dtype, model_name
        self._lock = None  # disk mode: a finalizer holding the directory's flock'ed fd while this tree may write
        if path is not None:  # one writer per directory: opening trims uncommitted rows, which would cut a live writer's
            try:
                os.makedirs(path, exist_ok=True)
                fd = os.open(path, os.O_RDONLY)  # flock on the directory itself: no extra file
            except OSError as e:  # a file on the way, no permission, a read-only disk: one line
                raise UserError(f"{path}: cannot make or open this directory ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(f"{path}: the tree is open for writing by another process (one writer at a time: a chat on the "
                                f"same --session, or a build; a reader can load a copy with in_ram=True)")
            self._lock = weakref.finalize(self, os.close, fd)  # released by close(), or when the tree is collected
        self.levels = []    # [0]: token ids (n,) uint32; [L]: gist bits (n, D) uint16
        self.versions = []  # [L]: RamRows of uint32 gist versions, parallel to levels[L] ([0] unused)

    def _add_level(self, count=0, versions=None, crcs=None):
        L = len(self.levels)
        np_dtype, width, code = (np.uint32, None, 0) if L == 0 else (np.uint16, self.dim, DTYPE_CODES[self.dtype])
        if self.path is None:
            rows = RamRows(np_dtype, width)
        else:
            file = os.path.join(self.path, f"lod{L}.bin")
            if count == 0:  # new level: a fresh file (replaces a leftover that was never committed)
                with open(file, "wb") as f:
                    f.write(header_bytes(L, self.dim, code, 0, self.model_name))
            rows = DiskRows(file, np_dtype, width, count, crcs)
        self.levels.append(rows)
        self.versions.append(RamRows(np.uint32, None))  # level 0 has none: tokens are never recomputed
        self.versions[L].append(np.zeros(count if L else 0, np.uint32) if versions is None else versions)

    # -------------------------------------------------------------------------
    # Reading

    @property
    def num_tokens(self):
        return self.levels[0].n

    def num_gists(self, level):
        assert level >= 1, "level 0 holds tokens, not gists"
        return self.levels[level].n if level < len(self.levels) else 0

    def tokens(self, start, end):
        assert 0 <= start <= end <= self.num_tokens, f"tokens [{start}, {end}) outside [0, {self.num_tokens})"
        return torch.from_numpy(self.levels[0].read(start, end).astype(np.int64))  # (end - start,)

    def gists(self, level, i0, i1):
        n = self.num_gists(level)
        assert 0 <= i0 <= i1 <= n, f"gists [{i0}, {i1}) of level {level} outside [0, {n})"
        if i1 == i0:
            return torch.zeros(0, self.dim)
        return from_bits(self.levels[level].read(i0, i1), self.dtype)  # (i1 - i0, D) float32

    def gist(self, level, index):
        return self.gists(level, index, index + 1)[0]  # (D,)

    def check_rows(self, vocab_size, where):
        """One pass over every stored row (COPY_ROWS at a time): token ids below vocab_size, gists
        finite. A memory damaged on disk is refused here, not deep in an embedding or the allocator."""
        for L, rows in enumerate(self.levels):
            for i in range(0, rows.n, COPY_ROWS):
                chunk = rows.read(i, min(i + COPY_ROWS, rows.n))
                if L == 0 and len(chunk) and int(chunk.max()) >= vocab_size:
                    bad = i + int(np.argmax(chunk >= vocab_size))
                    raise UserError(f"{where}: token {bad} has id {int(chunk[bad - i])}, outside the model's {vocab_size:,}-token vocabulary")
                if L > 0 and not torch.isfinite(from_bits(chunk, self.dtype)).all():
                    raise UserError(f"{where}: a level-{L} gist in rows {i}..{i + len(chunk) - 1} holds NaN or inf")
        return self

    def node(self, level, index):
        if level < 1 or (self.max_level is not None and level > self.max_level):
            raise IndexError(f"no level {level} in this tree (levels 1..{self.max_level or 'any'})")
        n, span = self.num_tokens, K ** level
        start, end = index * span, (index + 1) * span
        if index < 0 or start >= n:
            raise IndexError(f"node ({level}, {index}) has no tokens yet ({n} ingested)")
        parent_ok = (self.max_level is None or level < self.max_level) and (index // K + 1) * span * K <= n
        if level == 1:
            children = range(start, min(end, n))
        else:
            children = [(level - 1, j) for j in range(index * K, min((index + 1) * K, -(-n // (span // K))))]
        version = int(self.versions[level].read(index, index + 1)[0]) if index < self.num_gists(level) else 0
        return Node(level, index, start, end, (level + 1, index // K) if parent_ok else None, children, version, end <= n)

    # -------------------------------------------------------------------------
    # Writing

    def ingest(self, tokens):
        """Append tokens (list[int] or 1-D LongTensor, any length) and make every gist that completes."""
        ids = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
        if ids.ndim != 1:
            raise UserError(f"tokens must be 1-D, got shape {tuple(ids.shape)}")
        if len(ids) and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= 2 ** 32):
            raise UserError(f"token ids must be integers in [0, 2**32), got {ids.dtype} in [{ids.min()}, {ids.max()}]")
        for s in range(0, len(ids), INGEST_BATCH):
            self.levels[0].append(ids[s:s + INGEST_BATCH].astype(np.uint32))
            self._make_gists()

    @torch.no_grad()
    def _make_gists(self):
        """Bottom-up, the gist of every complete node that has none yet."""
        L = 1
        while self.gistnet is not None and (self.max_level is None or L <= self.max_level) and self.num_tokens >= K ** L:
            if L == len(self.levels):
                self._add_level()
            for a, b in self._batches(self.levels[L].n, self.num_tokens // K ** L):
                self.levels[L].append(self._compute(L, a, b))
                self.versions[L].append(np.zeros(b - a, np.uint32))
            L += 1

    @torch.no_grad()
    def refresh(self, start=0, end=None):
        """Recompute every gist overlapping tokens [start, end), at every level, and bump its version."""
        if self.gistnet is None:
            raise UserError("refresh needs a GistNet (this tree has gistnet=None)")
        end = self.num_tokens if end is None else min(end, self.num_tokens)
        assert start >= 0, f"start must be >= 0, got {start}"
        for L in range(1, len(self.levels)):
            span = K ** L  # the nodes overlapping [start, end):
            for a, b in self._batches(start // span, min(-(-end // span), self.levels[L].n)):
                self.levels[L].write(a, self._compute(L, a, b))
                self.versions[L].write(a, self.versions[L].read(a, b) + 1)

    def rewrite(self, start, tokens):
        """Edit the history in place: the tokens from `start` on become `tokens` (as many as there were:
        nothing moves), then every gist over them is recomputed (refresh) with its version bumped. This is
        how a Core-Knowledge memory's facts change with no training step; a Session's cache over the old
        gists is stale after it (open a new Session)."""
        ids = np.asarray(tokens)
        if ids.ndim != 1 or not len(ids) or not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= 2 ** 32:
            raise UserError(f"rewrite needs a non-empty 1-D list of token ids, got {ids.dtype} of shape {tuple(ids.shape)}")
        if not 0 <= start <= start + len(ids) <= self.num_tokens:
            raise UserError(f"rewrite of tokens [{start}, {start + len(ids)}) outside the history [0, {self.num_tokens})")
        self.levels[0].write(start, ids.astype(np.uint32))
        self.refresh(start, start + len(ids))

    def _batches(self, i0, i1):
        """Nodes i0..i1-1 split at the GIST_BATCH-aligned cell boundaries: [(a, b), ...]."""
        B = GIST_BATCH
        return [(a, min(a - a % B + B, i1)) for a in [i0] + list(range(i0 - i0 % B + B, i1, B)) if a < i1]

    def _compute(self, L, a, b):
        """Gist bits of level-L nodes a..b-1 (within one cell) from their children as stored: uint16 (b - a, D)."""
        if L == 1:
            ids = torch.from_numpy(self.levels[0].read(a * K, b * K).astype(np.int64))
            x = self.embed_tokens(ids.to(self.device))  # (n * K, D)
        else:
            x = from_bits(self.levels[L - 1].read(a * K, b * K), self.dtype)  # (n * K, D)
        row = a % GIST_BATCH  # the nodes' place in their cell
        cell = torch.zeros(GIST_BATCH, K, self.dim, device=self.device)  # (GIST_BATCH, K, D), rows not asked for zero
        cell[row:row + b - a] = x.to(self.device, torch.float32).view(b - a, K, self.dim)
        g = self.gistnet(cell, L)  # (GIST_BATCH, D): GistNets compute in float32
        assert g.shape == (GIST_BATCH, self.dim), f"gistnet returned {tuple(g.shape)}, expected {(GIST_BATCH, self.dim)}"
        return to_bits(g[row:row + b - a], self.dtype)

    # -------------------------------------------------------------------------
    # Persistence

    def _meta(self):
        """The commit record of the rows as they are now (meta.json; a session's session.json holds it too)."""
        meta = {
            "format_version": FORMAT_VERSION, "block_size": K, "dim": self.dim, "dtype": DTYPE_NAMES[self.dtype],
            "max_level": self.max_level, "model_name": self.model_name,
            "counts": [rows.n for rows in self.levels],
            "versions": {str(L): version_runs(v.read(0, v.n)) for L, v in enumerate(self.versions) if L >= 1},
            "page_crc32": [rows.page_crcs() for rows in self.levels],
        }
        meta["checksum"] = json_checksum(meta)
        return meta

    def flush_rows(self):
        """Disk mode: make every row ingested so far durable (data, then headers), not yet committed:
        meta.json (or a session.json holding this tree's meta, runtime.Session.save) commits them."""
        if self.path is not None:
            for rows in self.levels:
                rows.flush()

    def flush(self):
        """Disk mode: make everything ingested so far durable (data, then headers, then meta.json)."""
        if self.path is not None:
            self.flush_rows()
            atomic_write_json(self._meta(), os.path.join(self.path, "meta.json"))

    def close(self, flush=True):
        """Disk mode: flush (unless told not to: unflushed rows are then dropped, as after a crash),
        close the files and let another writer open the directory. The tree is unusable after."""
        if self.path is None or self._lock is None:
            return
        if flush:
            self.flush()
        for rows in self.levels:
            rows.mm = None
            rows.file.close()
        self._lock()  # the finalizer: closes the fd, which releases the lock
        self._lock = None

    def save(self, path):
        """Write the tree to directory `path` in the disk layout (for a disk tree at `path`: flush)."""
        if self.path is not None and os.path.realpath(path) == os.path.realpath(self.path):  # any spelling of its own
            return self.flush()                                                                 # directory (a link too)
        os.makedirs(path, exist_ok=True)
        meta_path = os.path.join(path, "meta.json")
        if os.path.exists(meta_path):
            os.remove(meta_path)  # a save that dies half-way leaves no meta.json, never a mix of two trees
        for L, rows in enumerate(self.levels):
            code = 0 if L == 0 else DTYPE_CODES[self.dtype]
            with atomic_path(os.path.join(path, f"lod{L}.bin")) as tmp, open(tmp, "wb") as f:
                f.write(header_bytes(L, self.dim, code, rows.n, self.model_name))
                for i in range(0, rows.n, COPY_ROWS):
                    f.write(rows.read(i, min(i + COPY_ROWS, rows.n)).tobytes())
        atomic_write_json(self._meta(), meta_path)

    @classmethod
    def load(cls, path, gistnet, embed_tokens, dim=None, in_ram=False, model_name=None, device="cpu", meta=None, meta_path=None):
        """Open a saved tree: disk mode on `path` (memory-mapped, ingest continues there; one writer
        at a time), or a copy in RAM (only reads the files). Given model_name, a tree built for
        another model is refused. meta: the commit record to open it at instead of meta.json's (a
        session's, read from meta_path: runtime.Session.save commits the tree and the session in one file)."""
        if meta is None:
            meta_path = os.path.join(path, "meta.json")
            if not os.path.exists(meta_path):
                raise UserError(f"{path}: no meta.json, not a saved MegaContext tree (or its save did not finish)")
        try:
            if meta is None:
                with open(meta_path, encoding="utf-8") as f:
                    meta = json.load(f)
            if not isinstance(meta, dict) or sorted(set(meta) - set(META_FIELDS)):
                raise ValueError(f"not a tree's metadata (a JSON object of the fields {', '.join(META_FIELDS)})")
            if ("checksum" in meta or "page_crc32" in meta) and meta.get("checksum") != json_checksum(meta):
                raise UserError(f"{meta_path}: the tree's metadata does not match its checksum (changed or damaged since it was saved)")
            version, block, d, counts = meta["format_version"], meta["block_size"], meta["dim"], meta["counts"]
            dtype = {name: t for t, name in DTYPE_NAMES.items()}[meta["dtype"]]
            max_level, stored_name, runs = meta["max_level"], meta["model_name"], meta["versions"]
            if not isinstance(stored_name, str) or type(d) is not int or d < 1:
                raise ValueError(f"model_name {stored_name!r} / dim {d!r} must be a string / a positive integer")
            if not isinstance(counts, list) or not counts or not all(type(c) is int and c >= 0 for c in counts):
                raise ValueError(f"counts {counts!r} are not row counts")
            if max_level is not None and (type(max_level) is not int or not 0 <= max_level < 64 or len(counts) > max_level + 1):
                raise ValueError(f"max_level {max_level!r} is not a level of a tree with {len(counts)} levels")
            if not isinstance(runs, dict) or not all(isinstance(v, list) and all(
                    isinstance(r, list) and len(r) == 3 and all(type(x) is int and x >= 0 for x in r) for r in v) for v in runs.values()):
                raise ValueError(f"versions {str(runs)[:80]} are not runs [i0, i1, version]")
            if not set(runs) <= {str(L) for L in range(1, len(counts))} or any(
                    not a < b <= counts[int(L)] for L, v in runs.items() for a, b, _ in v):
                raise ValueError(f"versions {str(runs)[:80]} name levels or rows the tree does not have")
            crcs = meta.get("page_crc32")  # absent: a tree saved before checksums, read unverified
            if "page_crc32" in meta and not (isinstance(crcs, list) and len(crcs) == len(counts) and all(
                    isinstance(c, list) and len(c) == -(-n // page_rows(row_bytes(L, d)))
                    and all(type(x) is int and 0 <= x < 2 ** 32 for x in c) for L, (c, n) in enumerate(zip(crcs, counts)))):
                raise ValueError("page_crc32 is not one list of crc32s per level, one per page of its rows")
        except (ValueError, KeyError, TypeError, RecursionError) as e:  # (JSON and UTF-8 errors are ValueErrors)
            raise UserError(f"{meta_path}: unreadable tree metadata ({type(e).__name__}: {str(e)[:200]})") from None
        if version != FORMAT_VERSION:
            raise UserError(f"{meta_path}: format version {version}, this code reads version {FORMAT_VERSION}")
        if block != K or (dim is not None and d != dim):
            raise UserError(f"{meta_path}: block size {block}, dim {d}; expected block size {K}, dim {dim or d}")
        if model_name is not None and model_name != stored_name:
            raise UserError(f"{meta_path}: built for model {stored_name!r}, not {model_name!r}")
        if any(counts[L] > counts[0] // K ** L for L in range(1, len(counts))):
            raise UserError(f"{meta_path}: inconsistent counts {counts} (more gists than complete nodes)")
        tree = cls.__new__(cls)
        tree._setup(d, gistnet, embed_tokens, max_level, None if in_ram else path, dtype, stored_name, device)
        if not in_ram:  # the writer, now that it holds the lock: what a killed write left is removed (not a live writer's)
            report_stale_temps(path)
        for L, count in enumerate(counts):
            file = os.path.join(path, f"lod{L}.bin")
            check_level_file(file, L, d, 0 if L == 0 else DTYPE_CODES[dtype], tree.model_name, count)
            versions = np.zeros(count if L else 0, np.uint32)
            for a, b, v in runs.get(str(L), []):
                versions[a:b] = v
            level_crcs = None if crcs is None else crcs[L]
            tree._add_level(count, versions, level_crcs)
            rows = tree.levels[L]
            if in_ram and count > 0:  # copy the committed rows (the file is only read), then check them all
                mm = np.memmap(file, rows.buf.dtype, "r", HEADER_BYTES, (count,) + rows.shape)
                for i in range(0, count, COPY_ROWS):
                    rows.append(mm[i:i + COPY_ROWS])
                rows.name = file
                rows.set_pages(level_crcs)
                rows.verify(0, count)
        return tree
