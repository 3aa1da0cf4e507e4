"""`edgec data fetch` / `data list` / `--data NAME` against a local HTTP server on 127.0.0.1 serving
files the test makes (nothing here reaches the internet). The registry's pins are replaced by the
test files' sizes and sha256s; the download code is the real one."""

import gzip
import hashlib
import http.server
import json
import os
import socket
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest

from edgec.base import data_fetch
from edgec.base.data_fetch import FetchableDataset, RemoteFile
from edgec.base.errors import RunError

NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz")


def idx_gz(array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


def synthetic_mnist():
    rng = np.random.default_rng(0)
    arrays = (rng.integers(0, 256, (60, 28, 28)), np.arange(60) % 10, rng.integers(0, 256, (20, 28, 28)),
              np.arange(20) % 10)
    return {name: idx_gz(a) for name, a in zip(NAMES, arrays)}


class Server:
    """Serves ``files`` ({url path: bytes}) with Range support; ``extra`` bytes are appended to every body."""

    def __init__(self):
        self.files, self.ranges, self.extra = {}, [], b""
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                body += server.extra
                start = 0
                if rng := self.headers.get("Range"):
                    server.ranges.append(rng)
                    start = int(rng.removeprefix("bytes=").rstrip("-"))
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:])

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def served(monkeypatch, tmp_path):
    """(server, registry entry) with the synthetic mnist served under /mnist/ and pinned in the registry."""
    server = Server()
    files = synthetic_mnist()
    server.files = {f"/mnist/{n}": b for n, b in files.items()}
    pinned = tuple(RemoteFile(n, len(b), hashlib.sha256(b).hexdigest()) for n, b in files.items())
    entry = FetchableDataset("mnist", (f"{server.url}/mnist/",), pinned, tuple(str(i) for i in range(10)))
    monkeypatch.setitem(data_fetch.DATASETS, "mnist", entry)
    monkeypatch.delenv(data_fetch.MIRROR_ENV, raising=False)
    yield server, entry
    server.close()


def cli_with_registry(entry, *args, cwd, check):
    """The real CLI in a subprocess whose registry pins ``entry`` (the synthetic files) for mnist."""
    pinned = json.dumps([[f.name, f.size, f.sha256] for f in entry.files])
    code = (
        "import json, sys\n"
        "from edgec.base import data_fetch as d\n"
        f"files = tuple(d.RemoteFile(*f) for f in json.loads({pinned!r}))\n"
        f"d.DATASETS['mnist'] = d.FetchableDataset('mnist', {entry.mirrors!r}, files, tuple('0123456789'))\n"
        "from edgec.cli import main\n"
        "sys.argv = ['edgec', *sys.argv[1:]]\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "160"}, timeout=900)
    assert proc.returncode == check, proc.stderr
    return proc


def test_fetch_then_data_name_builds_and_list_says_so(served, tmp_path):
    server, entry = served
    cache = tmp_path / "cache"
    missing = cli_with_registry(entry, "build", "--data", "mnist", "--stages", "train", "--cache-dir", cache,
                                cwd=tmp_path, check=2)
    assert missing.stderr.strip() == ("error: dataset 'mnist' is not downloaded: run `edgec data fetch mnist` "
                                      "(or --data mnist:PATH)")
    fetched = cli_with_registry(entry, "data", "fetch", "mnist", "--cache-dir", cache, cwd=tmp_path, check=0)
    assert "use --data mnist" in fetched.stdout
    for f in entry.files:
        assert (cache / "data" / "mnist" / f.name).read_bytes() == server.files[f"/mnist/{f.name}"]
    listed = cli_with_registry(entry, "data", "list", "--cache-dir", cache, cwd=tmp_path, check=0)
    row = next(line for line in listed.stdout.splitlines() if line.startswith("mnist "))
    assert "present" in row and str(cache / "data" / "mnist") in row
    assert "not downloaded" in next(line for line in listed.stdout.splitlines() if line.startswith("kmnist "))
    built = cli_with_registry(entry, "build", "--data", "mnist", "--stages", "train", "--epochs", "1", "--model",
                              "mlp", "--cache-dir", cache, "--out", tmp_path / "out", "--json", cwd=tmp_path, check=0)
    assert json.loads(built.stdout)["data"].startswith("mnist: ")


def test_truncated_part_resumes_with_a_range_request(served, tmp_path):
    server, entry = served
    first = entry.files[0]
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    body = server.files[f"/mnist/{first.name}"]
    (folder / (first.name + ".part")).write_bytes(body[:100])
    data_fetch.fetch("mnist", tmp_path)
    assert server.ranges == ["bytes=100-"]
    assert (folder / first.name).read_bytes() == body
    assert not list(folder.glob("*.part"))


def test_a_mismatch_is_refused_and_nothing_is_left(served, tmp_path):
    server, entry = served
    name = entry.files[1].name
    server.files[f"/mnist/{name}"] = b"\x00" * entry.files[1].size  # right size, wrong bytes
    with pytest.raises(RunError, match=f"sha256 .* is not the pinned {entry.files[1].sha256}"):
        data_fetch.fetch("mnist", tmp_path)
    folder = tmp_path / "data" / "mnist"
    assert not (folder / name).exists() and not (folder / (name + ".part")).exists()
    assert "partial (1 of 4 files)" in data_fetch.listing(tmp_path)[0]["state"]
    proc = cli_with_registry(entry, "data", "fetch", "mnist", "--cache-dir", tmp_path, cwd=tmp_path, check=1)
    assert len(proc.stderr.strip().splitlines()) == 1 and "refused and deleted" in proc.stderr


def test_an_oversized_body_is_refused(served, tmp_path):
    server, entry = served
    server.extra = b"x" * 10
    with pytest.raises(RunError, match="announces .* bytes but train-images-idx3-ubyte.gz is"):
        data_fetch.fetch("mnist", tmp_path)
    assert not list((tmp_path / "data" / "mnist").glob("train-images*"))


def test_404_and_connection_refused_are_one_line_errors(served, tmp_path):
    server, entry = served
    with pytest.raises(RunError, match="HTTP 404") as e:
        data_fetch.fetch("mnist", tmp_path, mirror=f"{server.url}/elsewhere")
    assert "\n" not in str(e.value)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RunError, match="cannot download .*refused") as e:
        data_fetch.fetch("mnist", tmp_path, mirror=f"http://127.0.0.1:{port}")
    assert "\n" not in str(e.value)
