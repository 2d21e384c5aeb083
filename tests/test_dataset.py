import io
import os
import sys
import time
import signal
import threading
import subprocess
import collections
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import pyarrow as pa
import pyarrow.parquet as pq

import nanochat.dataset as dataset
from nanochat.common import UserError
from nanochat.dataset import (download, download_shard, export_offline_corpus, get_data_dir, list_parquet_files,
                              parquets_iter_batched, shard_filename, split_document, stdlib_documents)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parquet_bytes(texts, row_group_size=None, column="text"):
    buf = io.BytesIO()
    pq.write_table(pa.table({column: pa.array(texts, type=pa.string())}), buf, row_group_size=row_group_size)
    return buf.getvalue()


def write_parquet(path, row_groups):
    """row_groups: list of lists of texts, one parquet row group each."""
    with pq.ParquetWriter(path, pa.schema([("text", pa.string())])) as writer:
        for texts in row_groups:
            writer.write_table(pa.table({"text": pa.array(texts, type=pa.string())}))


class ShardServer:
    """HTTP server on 127.0.0.1 serving self.files under /data/, counting requests per name.
    truncate_next[name] = n: the next n responses declare the full Content-Length but stop
    halfway (a dropped connection); always_short: always half the file with a matching
    Content-Length (a bad mirror: only the parquet check can catch it)."""

    def __init__(self):
        self.files, self.truncate_next, self.always_short, self.delay = {}, {}, set(), 0.0
        self.requests = collections.Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                with server.lock:
                    server.requests[name] += 1
                    data = server.files.get(name) if self.path.startswith("/data/") else None
                    cut = data is not None and server.truncate_next.get(name, 0) > 0
                    if cut:
                        server.truncate_next[name] -= 1
                time.sleep(server.delay)
                if data is None:
                    self.send_error(404)
                    return
                body = data[:len(data) // 2] if cut or name in server.always_short else data
                self.send_response(200)
                self.send_header("Content-Length", str(len(data) if cut else len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ShardServer()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.delenv("NANOCHAT_DATASET", raising=False)
    monkeypatch.delenv("NANOCHAT_DATA_URL", raising=False)


@pytest.fixture
def sleeps(monkeypatch):
    """Record the backoff waits instead of waiting."""
    waits = []
    monkeypatch.setattr(dataset, "backoff_wait", lambda seconds, stop=None: waits.append(seconds))
    return waits

# -----------------------------------------------------------------------------
# downloading


def test_truncated_download_is_retried_until_whole(server, sleeps, tmp_path):
    data = parquet_bytes([f"document {i} " * 50 for i in range(200)])
    server.files[shard_filename(0)] = data
    server.truncate_next[shard_filename(0)] = 2
    assert download_shard(0, server.url, str(tmp_path)) is True
    assert server.requests[shard_filename(0)] == 3
    assert sleeps == [2.0, 4.0]  # exponential backoff
    with open(tmp_path / shard_filename(0), "rb") as f:
        assert f.read() == data
    assert os.listdir(tmp_path) == [shard_filename(0)]  # no temp file left over


def test_always_truncated_download_fails_cleanly(server, sleeps, tmp_path):
    server.files[shard_filename(3)] = parquet_bytes(["x" * 1000] * 100)
    server.always_short.add(shard_filename(3))
    with pytest.raises(UserError, match="could not download .*shard_00003.parquet"):
        download_shard(3, server.url, str(tmp_path))
    assert server.requests[shard_filename(3)] == dataset.DOWNLOAD_ATTEMPTS
    assert sleeps == [2.0, 4.0, 8.0, 16.0]
    assert os.listdir(tmp_path) == []  # neither the bad file nor a temp file is kept


def test_missing_file_fails_without_retrying(server, sleeps, tmp_path):
    with pytest.raises(UserError, match="HTTP 404"):
        download_shard(0, server.url, str(tmp_path))
    assert server.requests[shard_filename(0)] == 1 and sleeps == []


def test_download_resumes_and_replaces_corrupt_shards(server, sleeps):
    names = [shard_filename(0), shard_filename(1), shard_filename(dataset.MAX_SHARD)]
    for i, name in enumerate(names):
        server.files[name] = parquet_bytes([f"shard {i} doc {j}" for j in range(10)])
    download(2, server.url, num_workers=2)
    data_dir = get_data_dir()
    assert data_dir.endswith("base_data_climbmix")
    assert [os.path.basename(p) for p in list_parquet_files()] == names  # val shard last
    assert all(server.requests[n] == 1 for n in names)
    download(2, server.url, num_workers=2)  # everything present and valid: no requests
    assert all(server.requests[n] == 1 for n in names)
    with open(os.path.join(data_dir, names[1]), "wb") as f:
        f.write(b"not a parquet file")
    download(2, server.url, num_workers=2)
    assert [server.requests[n] for n in names] == [1, 2, 1]
    assert list(parquets_iter_batched("train")) == [[f"shard 0 doc {j}" for j in range(10)],
                                                    [f"shard 1 doc {j}" for j in range(10)]]


def test_download_reports_failed_shards(server, sleeps):
    server.files[shard_filename(0)] = parquet_bytes(["a"])
    server.files[shard_filename(dataset.MAX_SHARD)] = parquet_bytes(["b"])
    with pytest.raises(UserError, match="1 of 3 shards failed"):
        download(2, server.url, num_workers=3)
    assert sorted(os.listdir(get_data_dir())) == [shard_filename(0), shard_filename(dataset.MAX_SHARD)]


def test_download_refuses_the_offline_corpus_directory(server, sleeps, monkeypatch):
    """NANOCHAT_DATASET=pystdlib (as the README exports for the CPU runs) + a download: ClimbMix shards would
    land beside the offline ones and the last of them (the val split) would be a foreign shard."""
    monkeypatch.setenv("NANOCHAT_DATASET", dataset.OFFLINE_NAME)
    server.files[shard_filename(0)] = parquet_bytes(["a"])
    with pytest.raises(UserError, match="offline corpus.*--offline"):
        download(1, server.url, num_workers=1)
    assert not os.path.exists(get_data_dir()) and not server.requests


def test_download_stops_early_when_the_first_shards_all_fail(server, sleeps):
    """Every shard failing (no connection, a wrong URL) went through all of them: ~30 s of retries each, hours for -n -1."""
    with pytest.raises(UserError, match=r"the first 2 shards all failed and none arrived, so the other \d+ were not tried"):
        download(40, server.url, num_workers=2)
    assert len(server.requests) < 10  # of 41


def test_download_removes_what_a_killed_one_left_and_refuses_a_negative_count(server, sleeps):
    data_dir = get_data_dir()
    os.makedirs(data_dir)
    stale = os.path.join(data_dir, shard_filename(0) + ".k3x_9q0z.tmp")  # atomic_path's temp of a killed download
    open(stale, "wb").write(b"PAR1 half a shard")
    server.files[shard_filename(0)] = parquet_bytes(["a"])
    server.files[shard_filename(dataset.MAX_SHARD)] = parquet_bytes(["b"])
    download(1, server.url, num_workers=1)
    assert sorted(os.listdir(data_dir)) == [shard_filename(0), shard_filename(dataset.MAX_SHARD)]
    with pytest.raises(UserError, match="-n/--num-files must be -1 \\(all\\) or a count, got -8"):  # it meant all 6,542
        download(-8, server.url)


def test_ctrl_c_stops_the_download_within_a_shard(server):
    """Ctrl-C printed nothing and went on fetching every queued shard (all 6,543 of them with the default -n -1)."""
    for i in list(range(40)) + [dataset.MAX_SHARD]:
        server.files[shard_filename(i)] = parquet_bytes([f"shard {i}"])
    server.delay = 0.3
    proc = subprocess.Popen([sys.executable, "-m", "nanochat.dataset", "-n", "40", "-w", "2", "--base-url", server.url],
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while sum(server.requests.values()) < 2 and time.time() < deadline:  # downloading (its imports are done)
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert sum(server.requests.values()) < 20  # of 41: it stopped, it did not drain the queue


def test_a_stop_is_seen_after_the_next_read_not_after_a_whole_chunk(tmp_path):
    """fetch_url read 1 MiB chunks: on a slow link Ctrl-C waited for a whole MiB to trickle in (13.7 s at 64 KB/s)."""
    sent = []

    class Trickle(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(40 * 1024))
            self.end_headers()
            try:
                for _ in range(40):  # 1 KB every 0.1 s
                    self.wfile.write(b"x" * 1024)
                    self.wfile.flush()
                    sent.append(1)
                    time.sleep(0.1)
            except OSError:  # the client hung up
                pass

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        stop = threading.Event()
        stop.set()
        with pytest.raises(dataset.Stopped):
            dataset.fetch_url(f"http://127.0.0.1:{httpd.server_address[1]}/x", str(tmp_path / "x"), stop=stop)
        assert len(sent) < 20  # it stopped with the body still arriving (a 1 MiB read took all 40 KB first)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_offline_refuses_the_download_flags():
    """--offline -n 1 --base-url ... exported the whole corpus and said nothing of the flags."""
    r = run_cli(["--offline", "-n", "1", "--base-url", "http://127.0.0.1:1/x"])
    assert r.returncode == 2 and "-n, --base-url does not apply" in r.stderr, r.stderr


def run_cli(args, extra_env=None):
    env = {**os.environ, **(extra_env or {})}
    return subprocess.run([sys.executable, "-m", "nanochat.dataset", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_bad_url_is_one_line_error(server):
    result = run_cli(["-n", "1", "-w", "1", "--base-url", server.url + "/nowhere"])
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "HTTP 404" in lines[0], result.stderr
    # the URL also comes from $NANOCHAT_DATA_URL, and a malformed one fails at once
    result = run_cli(["-n", "1"], {"NANOCHAT_DATA_URL": "no-scheme/data"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and "no-scheme/data" in lines[0], result.stderr

# -----------------------------------------------------------------------------
# reading


def test_list_parquet_files(tmp_path):
    with pytest.raises(UserError, match="no parquet shards"):
        list_parquet_files(str(tmp_path / "missing"))
    for name in ["shard_00001.parquet", "shard_00000.parquet", "shard_00002.parquet.abc.tmp", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert list_parquet_files(str(tmp_path)) == [str(tmp_path / "shard_00000.parquet"),
                                                  str(tmp_path / "shard_00001.parquet")]


def test_ranks_stride_the_row_groups_of_each_file_as_upstream(monkeypatch):
    """Upstream starts at row group `rank` in every file; ours strode over the split's row groups counted
    across files (rank 1 of 2 read file 1's row groups 0 and 2 here, where upstream reads its row group 1)."""
    monkeypatch.setenv("NANOCHAT_DATASET", "tiny")
    data_dir = get_data_dir()
    os.makedirs(data_dir)
    layout = [[2, 1, 1], [1, 1, 1], [1]]  # docs per row group; the last file is val
    for pq_idx, sizes in enumerate(layout):
        write_parquet(os.path.join(data_dir, shard_filename(pq_idx)),
                      [[f"{pq_idx}.{rg}.{row}" for row in range(n)] for rg, n in enumerate(sizes)])
    assert list(parquets_iter_batched("train")) == [["0.0.0", "0.0.1"], ["0.1.0"], ["0.2.0"], ["1.0.0"], ["1.1.0"], ["1.2.0"]]
    assert list(parquets_iter_batched("train", start=1, step=2)) == [["0.1.0"], ["1.1.0"]]
    assert list(parquets_iter_batched("train", start=0, step=2)) == [["0.0.0", "0.0.1"], ["0.2.0"], ["1.0.0"], ["1.2.0"]]
    assert list(parquets_iter_batched("val")) == [["2.0.0"]]
    assert list(parquets_iter_batched("val", start=1, step=2)) == []


def test_corrupt_shards_give_user_errors(tmp_path):
    write_parquet(str(tmp_path / shard_filename(0)), [["fine"]])
    (tmp_path / shard_filename(1)).write_bytes(parquet_bytes(["a", "b"])[:-20])
    write_parquet(str(tmp_path / shard_filename(2)), [["val"]])
    with pytest.raises(UserError, match=f"corrupt parquet shard {tmp_path / shard_filename(1)}"):
        list(parquets_iter_batched("train", data_dir=str(tmp_path)))
    (tmp_path / shard_filename(1)).write_bytes(parquet_bytes(["a"], column="content"))
    with pytest.raises(UserError, match="has no `text` column"):
        list(parquets_iter_batched("train", data_dir=str(tmp_path)))
    pq.write_table(pa.table({"text": pa.array([b"a", b"b"], type=pa.binary())}), str(tmp_path / shard_filename(1)))
    with pytest.raises(UserError, match="its `text` column holds binary, not strings"):  # a traceback from the tokenizer
        list(parquets_iter_batched("train", data_dir=str(tmp_path)))
    assert not dataset.is_valid_shard(str(tmp_path / shard_filename(1)))  # a download would have kept it
    write_parquet(str(tmp_path / shard_filename(1)), [["a", None, "b"]])  # a null cell: skipped, as tok_train skips it
    assert list(parquets_iter_batched("train", data_dir=str(tmp_path))) == [["fine"], ["a", "b"]]
    os.remove(tmp_path / shard_filename(1))
    os.remove(tmp_path / shard_filename(2))
    with pytest.raises(UserError, match="at least 2 shards"):
        list(parquets_iter_batched("val", data_dir=str(tmp_path)))

# -----------------------------------------------------------------------------
# the offline corpus


def test_offline_export_of_this_python(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["dataset", "--offline"])
    dataset.main()
    out_dir = get_data_dir("pystdlib")
    assert out_dir.endswith("base_data_pystdlib")
    assert "Wrote" in capsys.readouterr().out
    paths = list_parquet_files(out_dir)
    assert len(paths) >= 3
    rows = [pq.ParquetFile(p).metadata.num_rows for p in paths]
    assert all(pq.ParquetFile(p).num_row_groups >= 3 for p in paths)
    assert rows[-1] >= 0.5 * sum(rows) / len(rows)  # the val shard is a full-sized one
    texts = [t for p in paths for t in pq.read_table(p).column("text").to_pylist()]
    assert texts == [c for d in stdlib_documents() for c in split_document(d)] and len(texts) == sum(rows)
    assert max(len(t) for t in texts) <= 2000
    assert any("def urlopen(" in t for t in texts)  # urllib/request.py
    assert not any("site-packages" in p for p in paths)
    # idempotent: a second run leaves the files alone
    mtimes = [os.stat(p).st_mtime_ns for p in paths]
    export_offline_corpus()
    assert "already complete" in capsys.readouterr().out
    assert [os.stat(p).st_mtime_ns for p in paths] == mtimes


def test_offline_export_of_a_small_tree(tmp_path):
    src = tmp_path / "lib"
    files = {"a.py": "print('a')\n", "pkg/b.py": "B = 2\n", "site-packages/c.py": "C = 3\n",
             "dist-packages/d.py": "D = 4\n", "pkg/__pycache__/e.py": "E = 5\n", "notes.txt": "notes\n",
             "empty.py": "\n"}
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    (src / "latin1.py").write_bytes("# caf\xe9\n".encode("latin-1"))
    docs = stdlib_documents(str(src))
    from pydoc_data.topics import topics
    in_order = ["print('a')\n", "B = 2\n"] + [topics[k] for k in sorted(topics)]  # a.py < pkg/b.py
    assert sorted(docs) == sorted(in_order)
    assert docs == stdlib_documents(str(src))  # deterministic order
    assert docs != in_order                    # ...but shuffled
    first, second = tmp_path / "out1", tmp_path / "out2"
    second.mkdir()
    write_parquet(str(second / shard_filename(9)), [["stale"]])  # from an older, bigger export
    for out in (first, second):
        export_offline_corpus(str(out), stdlib_dir=str(src))
    read = lambda out: [pq.read_table(p).column("text").to_pylist() for p in list_parquet_files(str(out))]
    assert read(first) == read(second) and len(read(first)) == 2
    assert [t for shard in read(first) for t in shard] == [c for d in docs for c in split_document(d)]
    # an export with a shard missing is not complete: it is written again
    os.remove(first / shard_filename(1))
    export_offline_corpus(str(first), stdlib_dir=str(src))
    assert read(first) == read(second)


def test_split_document_is_lossless_and_cuts_at_paragraphs():
    text = "a" * 30 + "\n\n" + "b" * 30 + "\n\n" + "c" * 10 + "\n" + "d" * 75
    chunks = split_document(text, max_chars=40)
    assert "".join(chunks) == text
    assert all(len(c) <= 40 for c in chunks)
    assert chunks[0] == "a" * 30 + "\n\n" and chunks[1] == "b" * 30 + "\n\n"  # paragraph boundaries first
    assert chunks[2] == "c" * 10 + "\n"  # then line ends; an over-long line is cut anywhere
    assert split_document("short", max_chars=40) == ["short"]
