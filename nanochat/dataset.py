"""
The pretraining data: a directory of parquet shards, each with one string column `text`.
The last shard (in sorted order) is the validation shard; all the others are train.

- get_data_dir, list_parquet_files, parquets_iter_batched: read the shards.
- python -m nanochat.dataset -n 8: download the first 8 climbmix train shards plus the
  validation shard (resumable: shards already present and valid are skipped; each download
  is verified and then renamed into place, so a truncated file is never kept).
- python -m nanochat.dataset --offline: export a small real corpus that every machine already
  has (this Python's standard library sources and pydoc topics) as dataset "pystdlib";
  train on it with NANOCHAT_DATASET=pystdlib.
"""

import os
import json
import random
import argparse
import platform
import sysconfig
import threading
import http.client
import urllib.error
import urllib.request
from bisect import bisect_right
from concurrent.futures import ThreadPoolExecutor, as_completed

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import UserError, cli_main, get_base_dir, atomic_path, atomic_write_json, report_stale_temps

# -----------------------------------------------------------------------------
# The hosted pretraining data (upstream nanochat's ClimbMix-400B, reshuffled and resharded)

DEFAULT_BASE_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
MAX_SHARD = 6542         # the last shard, shard_06542.parquet, is the validation shard: always downloaded
DOWNLOAD_ATTEMPTS = 5
BACKOFF_SECONDS = 2.0    # wait 2, 4, 8, 16 s between attempts
CHUNK_BYTES = 1 << 20

# The embedded offline corpus
OFFLINE_NAME = "pystdlib"
OFFLINE_SEED = 42
OFFLINE_MAX_DOC_CHARS = 2000      # files are cut into documents of at most this (~450 tokens)
OFFLINE_DOCS_PER_SHARD = 2048     # ~8 shards from a full CPython stdlib
OFFLINE_DOCS_PER_ROW_GROUP = 256  # 8 row groups per shard, so even the val shard feeds 8 ranks
OFFLINE_FORMAT = 2                # bump when the export changes, so old exports are rewritten


def shard_filename(index):
    return f"shard_{index:05d}.parquet"


def get_data_dir(name=None):
    """<base>/base_data_<name>, name = $NANOCHAT_DATASET or "climbmix"."""
    name = name or os.environ.get("NANOCHAT_DATASET") or "climbmix"
    return os.path.join(get_base_dir(), f"base_data_{name}")

# -----------------------------------------------------------------------------
# Reading shards


def list_parquet_files(data_dir=None):
    """Sorted full paths of the shards in data_dir (temp files of running writes are ignored)."""
    data_dir = data_dir or get_data_dir()
    names = sorted(f for f in os.listdir(data_dir) if f.endswith(".parquet")) if os.path.isdir(data_dir) else []
    if not names:
        raise UserError(f"no parquet shards in {data_dir}; download some with `python -m nanochat.dataset -n 8`, "
                        f"or export the offline corpus with `python -m nanochat.dataset --offline` "
                        f"and set NANOCHAT_DATASET={OFFLINE_NAME}")
    return [os.path.join(data_dir, f) for f in names]


def open_shard(path):
    """pq.ParquetFile for path; UserError naming the file if it is not a readable shard."""
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"corrupt parquet shard {path} ({first_line}); delete it and fetch it again") from e
    if "text" not in pf.schema_arrow.names:
        raise UserError(f"parquet shard {path} has no `text` column")
    kind = pf.schema_arrow.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"parquet shard {path}: its `text` column holds {kind}, not strings")
    return pf


def read_row_group(path, rg_idx):
    """The `text` column of one row group, as a list of str (null cells skipped, as tok_train skips them)."""
    pf = open_shard(path)
    try:
        column = pf.read_row_group(rg_idx, columns=["text"]).column("text")
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"corrupt parquet shard {path}: cannot read row group {rg_idx} ({e})") from e
    texts = column.to_pylist()
    return texts if column.null_count == 0 else [t for t in texts if t is not None]


def split_paths(split, data_dir=None):
    """The shards of a split: "train" = all but the last, "val" = the last."""
    assert split in ("train", "val"), f"split must be 'train' or 'val', got {split!r}"
    paths = list_parquet_files(data_dir)
    if len(paths) < 2:
        raise UserError(f"need at least 2 shards in {os.path.dirname(paths[0])} "
                        f"(train + the last one for val), found 1")
    return paths[:-1] if split == "train" else paths[-1:]


def row_group_offsets(paths):
    """offsets[i] = number of row groups in paths[:i]; offsets[-1] is the total. Row group g of
    the split (counted over all its files in order) is row group g - offsets[i] of file
    i = bisect_right(offsets, g) - 1."""
    offsets = [0]
    for path in paths:
        offsets.append(offsets[-1] + open_shard(path).num_row_groups)
    return offsets


def locate_row_group(offsets, g):
    """Global row group index g -> (pq_idx, rg_idx)."""
    pq_idx = bisect_right(offsets, g) - 1
    return pq_idx, g - offsets[pq_idx]


def strided_row_groups(num_row_groups, start=0, step=1):
    """Upstream's reading order: (pq_idx, rg_idx) of row groups start, start+step, ... of each file in
    turn, for files of num_row_groups[pq_idx] row groups (DDP: start=rank, step=world_size)."""
    return [(pq_idx, rg_idx) for pq_idx, n in enumerate(num_row_groups) for rg_idx in range(start, n, step)]


def parquets_iter_batched(split, start=0, step=1, data_dir=None):
    """Yield the texts (list[str]) of the split's row groups in strided_row_groups order."""
    paths = split_paths(split, data_dir)
    for pq_idx, rg_idx in strided_row_groups([open_shard(path).num_row_groups for path in paths], start, step):
        yield read_row_group(paths[pq_idx], rg_idx)

# -----------------------------------------------------------------------------
# Downloading


def is_valid_shard(path):
    try:
        open_shard(path)
        return True
    except UserError:
        return False


class Stopped(Exception):
    """The download was stopped (Ctrl-C, or every first try failed): a worker leaves its shard."""


def fetch_url(url, dst, timeout=60, stop=None):
    """Stream url into the file dst; returns the byte count. Raises if the body is shorter than
    its Content-Length (urllib itself silently returns a short body when the connection drops),
    and Stopped between reads once the event `stop` is set."""
    request = urllib.request.Request(url, headers={"User-Agent": "nanochat"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dst, "wb") as f:
        expected = response.headers.get("Content-Length")
        nbytes = 0
        while chunk := response.read1(CHUNK_BYTES):  # what one read brings (read() waits for a whole chunk: Ctrl-C waited too)
            if stop is not None and stop.is_set():
                raise Stopped()
            f.write(chunk)
            nbytes += len(chunk)
    if expected is not None and nbytes != int(expected):
        raise OSError(f"truncated download: {nbytes} of {expected} bytes")
    return nbytes


def backoff_wait(seconds, stop=None):
    """The wait between a shard's attempts; a set `stop` ends it at once."""
    (stop or threading.Event()).wait(seconds)


def download_shard(index, base_url, data_dir, attempts=DOWNLOAD_ATTEMPTS, stop=None):
    """Download one shard into data_dir. Returns True if downloaded, False if a valid copy was
    already there. Retries with exponential backoff; UserError once the attempts run out, Stopped
    once the event `stop` is set (its partial file removed)."""
    filename = shard_filename(index)
    path = os.path.join(data_dir, filename)
    if os.path.exists(path):
        if is_valid_shard(path):
            print(f"{filename}: already present, skipping", flush=True)
            return False
        print(f"{filename}: present but not a valid shard, downloading it again", flush=True)
    url = f"{base_url.rstrip('/')}/{filename}"
    error = None
    for attempt in range(1, attempts + 1):
        if stop is not None and stop.is_set():
            raise Stopped()
        try:
            with atomic_path(path) as tmp:  # the temp file is removed on any failure
                nbytes = fetch_url(url, tmp, stop=stop)
                if not is_valid_shard(tmp):
                    raise OSError("the downloaded file is not a readable parquet shard with a `text` column")
            print(f"{filename}: downloaded {nbytes / 1e6:.1f} MB", flush=True)
            return True
        except ValueError as e:  # malformed URL: retrying cannot help
            raise UserError(f"bad download URL {url!r}: {e}") from e
        except urllib.error.HTTPError as e:
            error = f"HTTP {e.code} {e.reason}"
            if 400 <= e.code < 500 and e.code not in (408, 429):  # not found, forbidden...: permanent
                break
        except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, truncation
            error = str(e) or type(e).__name__
        print(f"{filename}: attempt {attempt}/{attempts} failed: {error}", flush=True)
        if attempt < attempts:
            backoff_wait(BACKOFF_SECONDS * 2 ** (attempt - 1), stop)
    raise UserError(f"could not download {url}: {error}")


def download(num_files, base_url=DEFAULT_BASE_URL, num_workers=4, data_dir=None):
    """Download train shards 0..num_files-1 (-1 = all) plus the validation shard. Stops early, with the
    first error, when the first shards to finish (one per worker) all failed and none has arrived (no
    connection: hours of retries otherwise); Ctrl-C stops the workers at their next read (on a
    stalled connection that is its 60 s socket timeout)."""
    if num_workers < 1:
        raise UserError(f"-w/--num-workers must be at least 1, got {num_workers}")
    if num_files < -1:
        raise UserError(f"-n/--num-files must be -1 (all) or a count, got {num_files}")
    data_dir = data_dir or get_data_dir()
    if os.path.basename(os.path.normpath(data_dir)) == f"base_data_{OFFLINE_NAME}":  # its shard names would mix in
        raise UserError(f"{data_dir} holds the embedded offline corpus (NANOCHAT_DATASET={OFFLINE_NAME}): "
                        "`--offline` exports it; unset NANOCHAT_DATASET to download the ClimbMix shards")
    os.makedirs(data_dir, exist_ok=True)
    report_stale_temps(data_dir)  # what a killed download left
    num_train = MAX_SHARD if num_files < 0 else min(num_files, MAX_SHARD)
    indices = list(range(num_train)) + [MAX_SHARD]
    print(f"Downloading {num_train} train shards + the validation shard from {base_url}")
    print(f"into {data_dir} with {num_workers} workers", flush=True)
    stop = threading.Event()
    pool = ThreadPoolExecutor(num_workers)
    downloaded, arrived, failures = 0, 0, []
    try:
        futures = [pool.submit(download_shard, index, base_url, data_dir, stop=stop) for index in indices]
        for future in as_completed(futures):
            try:
                downloaded += future.result()
                arrived += 1
            except UserError as e:
                failures.append(str(e))
                if arrived == 0 and len(failures) >= min(num_workers, len(indices)) and len(failures) < len(indices):
                    raise UserError(f"the first {len(failures)} shards all failed and none arrived, so the other "
                                    f"{len(indices) - len(failures)} were not tried (no connection?); first: {failures[0]}")
    finally:  # an error above or Ctrl-C: queued shards are dropped, running ones stop at their next chunk
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
    if failures:
        raise UserError(f"{len(failures)} of {len(indices)} shards failed (re-run to resume); first: {failures[0]}")
    print(f"Done: {downloaded} downloaded, {len(indices) - downloaded} already present, in {data_dir}")

# -----------------------------------------------------------------------------
# The embedded offline corpus


def stdlib_documents(stdlib_dir=None):
    """One text per .py file of the standard library (site-packages and dist-packages
    excluded) and per pydoc topic: sorted, then shuffled with a fixed seed."""
    stdlib_dir = stdlib_dir or sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(stdlib_dir):
        raise UserError(f"standard library directory {stdlib_dir} not found")
    paths = []
    for root, dirs, files in os.walk(stdlib_dir):
        dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__")]
        paths.extend(os.path.relpath(os.path.join(root, f), stdlib_dir) for f in files if f.endswith(".py"))
    docs = []
    for relpath in sorted(paths):
        with open(os.path.join(stdlib_dir, relpath), "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:  # a few test files are deliberately in other encodings
            continue
        if text.strip():
            docs.append(text)
    try:
        from pydoc_data.topics import topics
        docs.extend(topics[key] for key in sorted(topics))
    except ImportError:  # some distributions split pydoc_data out
        pass
    random.Random(OFFLINE_SEED).shuffle(docs)
    return docs


def split_document(text, max_chars=OFFLINE_MAX_DOC_CHARS):
    """Cut text into pieces of at most max_chars, at paragraph (blank line) boundaries where
    possible, else at line ends, else anywhere; the pieces concatenate back to text.
    Why: the loader crops a document longer than a row and drops the rest, so whole source
    files (up to 200 KB) would only ever show the model their first few hundred tokens."""
    pieces = []  # the smallest units we cut at, in order
    paragraphs = text.split("\n\n")
    for i, para in enumerate(paragraphs):
        para = para + "\n\n" if i < len(paragraphs) - 1 else para
        for line in ([para] if len(para) <= max_chars else para.splitlines(keepends=True)):
            pieces.extend(line[j:j + max_chars] for j in range(0, len(line), max_chars))
    chunks, current = [], ""
    for piece in pieces:
        if current and len(current) + len(piece) > max_chars:
            chunks.append(current)
            current = ""
        current += piece
    if current:
        chunks.append(current)
    return chunks


def _offline_export_is_complete(out_dir, source):
    manifest_path = os.path.join(out_dir, "manifest.json")
    if not os.path.exists(manifest_path):
        return False
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    if {k: manifest.get(k) for k in source} != source:
        return False
    present = sorted(f for f in os.listdir(out_dir) if f.endswith(".parquet"))
    return present == manifest.get("shards") and all(is_valid_shard(os.path.join(out_dir, f)) for f in present)


def export_offline_corpus(out_dir=None, stdlib_dir=None):
    """Write the offline corpus as shards like the real data (one `text` column, several row
    groups per shard, last shard = val) into out_dir (default <base>/base_data_pystdlib).
    Idempotent: a complete export from the same Python is left alone. Returns out_dir."""
    out_dir = out_dir or get_data_dir(OFFLINE_NAME)
    stdlib_dir = stdlib_dir or sysconfig.get_paths()["stdlib"]
    source = {"format": OFFLINE_FORMAT, "python": platform.python_version(), "stdlib": stdlib_dir,
              "seed": OFFLINE_SEED, "max_doc_chars": OFFLINE_MAX_DOC_CHARS, "docs_per_shard": OFFLINE_DOCS_PER_SHARD,
              "docs_per_row_group": OFFLINE_DOCS_PER_ROW_GROUP}
    if _offline_export_is_complete(out_dir, source):
        print(f"Offline corpus already complete in {out_dir}, nothing to do")
        return out_dir
    docs = [chunk for doc in stdlib_documents(stdlib_dir) for chunk in split_document(doc)]  # a file's pieces stay together
    if len(docs) < 2:
        raise UserError(f"found only {len(docs)} documents under {stdlib_dir}; need at least 2 (train + val)")
    num_shards = max(2, round(len(docs) / OFFLINE_DOCS_PER_SHARD))
    os.makedirs(out_dir, exist_ok=True)
    manifest_path = os.path.join(out_dir, "manifest.json")
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # an interrupted rewrite must not look complete
    names = []
    for i in range(num_shards):  # equal-sized shards, so the last (val) one is a full shard too
        shard_docs = docs[i * len(docs) // num_shards: (i + 1) * len(docs) // num_shards]
        table = pa.table({"text": pa.array(shard_docs, type=pa.string())})
        names.append(shard_filename(i))
        with atomic_path(os.path.join(out_dir, names[-1])) as tmp:
            pq.write_table(table, tmp, row_group_size=OFFLINE_DOCS_PER_ROW_GROUP)
    for f in os.listdir(out_dir):  # shards of an older, larger export would become the val shard
        if f.endswith(".parquet") and f not in names:
            os.remove(os.path.join(out_dir, f))
    atomic_write_json({**source, "num_docs": len(docs), "shards": names}, manifest_path)
    megabytes = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    print(f"Wrote {len(docs)} documents ({megabytes:.1f} MB of text) as {num_shards} shards "
          f"({num_shards - 1} train + 1 val) to {out_dir}")
    print(f"Train on it with NANOCHAT_DATASET={OFFLINE_NAME}")
    return out_dir

# -----------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description="Download the pretraining shards, or export the offline corpus")
    parser.add_argument("-n", "--num-files", type=int, default=-1,
                        help="number of train shards to download (-1 = all); the validation shard is always added")
    parser.add_argument("-w", "--num-workers", type=int, default=4, help="parallel downloads")
    parser.add_argument("--base-url", default=os.environ.get("NANOCHAT_DATA_URL") or DEFAULT_BASE_URL,
                        help="where the shards live (default: $NANOCHAT_DATA_URL, else the ClimbMix shards)")
    parser.add_argument("--offline", action="store_true",
                        help=f"export the embedded corpus (this Python's stdlib) as dataset {OFFLINE_NAME!r} instead")
    args = parser.parse_args()
    if args.offline:
        given = [flag for flag, dest in (("-n", "num_files"), ("-w", "num_workers"), ("--base-url", "base_url"))
                 if getattr(args, dest) != parser.get_default(dest)]
        if given:
            parser.error(f"--offline exports the whole embedded corpus and downloads nothing: {', '.join(given)} does not apply")
        export_offline_corpus()
    else:
        download(args.num_files, args.base_url, args.num_workers)


if __name__ == "__main__":
    cli_main(main)
