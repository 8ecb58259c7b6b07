"""Tests for tinyddpm.download against fake mirrors on a loopback HTTP server.

Nothing here leaves 127.0.0.1: the "MNIST" files are a few bytes made up in
the test, and their digests are computed here and passed in as the table.
"""

import gzip
import hashlib
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tinyddpm import data
from tinyddpm.download import MNIST_SHA256, MNISTDownloadError, download_mnist

FILES = {
    "train-images-idx3-ubyte.gz": gzip.compress(b"pretend these are 60,000 images"),
    "train-labels-idx1-ubyte.gz": gzip.compress(b"pretend these are their labels"),
}
TABLE = {name: hashlib.sha256(body).hexdigest() for name, body in FILES.items()}

STALL = "stall"  # answer nothing until the test ends
STALL_BODY = "stall-body"  # send headers and half the body, then nothing
TIMEOUT = 0.5


class FakeMirrorHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        server.requests.append(self.path)
        route = server.routes.get(self.path)
        if route is None:
            self.send_error(404)
        elif route == STALL:
            server.release.wait(10)
        elif route == STALL_BODY:
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 500)
            self.wfile.flush()
            server.release.wait(10)
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(len(route)))
            self.end_headers()
            self.wfile.write(route)

    def log_message(self, *args):
        pass  # keep pytest's output clean


class FakeMirrors(ThreadingHTTPServer):
    # Handler threads are joined by server_close(), so no test leaves one behind.
    daemon_threads = False

    def handle_error(self, request, client_address):
        pass  # the client hanging up on a stalled handler is expected

    def url(self, mirror):
        return f"http://127.0.0.1:{self.server_address[1]}/{mirror}/"


@pytest.fixture
def server():
    httpd = FakeMirrors(("127.0.0.1", 0), FakeMirrorHandler)
    httpd.routes, httpd.requests, httpd.release = {}, [], threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield httpd
    httpd.release.set()  # let stalled handlers finish
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)
    assert not thread.is_alive()


def serve(server, mirror, files):
    for name, body in files.items():
        server.routes[f"/{mirror}/{name}"] = body


def fetch(server, tmp_path, mirrors, **kwargs):
    urls = [server.url(m) for m in mirrors]
    return download_mnist(tmp_path, mirrors=urls, timeout=TIMEOUT, progress=False, sha256=TABLE, **kwargs)


def assert_downloaded(tmp_path, paths):
    assert paths == [tmp_path / name for name in FILES]
    for name, body in FILES.items():
        assert (tmp_path / name).read_bytes() == body
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in FILES]
    assert leftovers == [], "temporary files were left behind"


def test_good_files_download_and_verify(server, tmp_path):
    serve(server, "a", FILES)
    assert_downloaded(tmp_path, fetch(server, tmp_path, ["a", "b"]))
    assert all(path.startswith("/a/") for path in server.requests)


def test_corrupted_file_falls_back_to_next_mirror(server, tmp_path):
    serve(server, "a", {name: body[:-1] + b"!" for name, body in FILES.items()})
    serve(server, "b", FILES)
    assert_downloaded(tmp_path, fetch(server, tmp_path, ["a", "b"]))
    assert sum(path.startswith("/b/") for path in server.requests) == len(FILES)


def test_missing_file_falls_back_to_next_mirror(server, tmp_path):
    serve(server, "b", FILES)  # mirror "a" answers 404 for everything
    assert_downloaded(tmp_path, fetch(server, tmp_path, ["a", "b"]))


def test_unreachable_mirror_falls_back(server, tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nobody listens
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/"
    serve(server, "b", FILES)
    paths = download_mnist(
        tmp_path, mirrors=[dead, server.url("b")], timeout=TIMEOUT, progress=False, sha256=TABLE
    )
    assert_downloaded(tmp_path, paths)


@pytest.mark.parametrize("stall", [STALL, STALL_BODY])
def test_stalled_mirror_times_out_and_falls_back(server, tmp_path, stall):
    serve(server, "a", {name: stall for name in FILES})
    serve(server, "b", FILES)
    start = time.monotonic()
    assert_downloaded(tmp_path, fetch(server, tmp_path, ["a", "b"]))
    assert time.monotonic() - start < 5 * TIMEOUT * len(FILES)


def test_stalled_only_mirror_raises_clearly(server, tmp_path):
    serve(server, "a", {name: STALL for name in FILES})
    with pytest.raises(MNISTDownloadError, match="timed out") as info:
        fetch(server, tmp_path, ["a"])
    assert "train-images-idx3-ubyte.gz" in str(info.value)


def test_all_mirrors_failing_names_the_file_and_each_failure(server, tmp_path):
    serve(server, "a", {name: b"garbage" for name in FILES})  # "b" has nothing: 404
    with pytest.raises(MNISTDownloadError) as info:
        fetch(server, tmp_path, ["a", "b"])
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message
    assert server.url("a") in message and "SHA-256 mismatch" in message
    assert server.url("b") in message and "404" in message
    assert list(tmp_path.iterdir()) == [], "a failed download must leave nothing behind"


def test_existing_good_file_is_not_downloaded_again(server, tmp_path):
    for name, body in FILES.items():
        (tmp_path / name).write_bytes(body)
    assert_downloaded(tmp_path, fetch(server, tmp_path, ["a"]))
    assert server.requests == []


def test_existing_bad_file_is_replaced(server, tmp_path):
    name = "train-labels-idx1-ubyte.gz"
    (tmp_path / name).write_bytes(b"half a download")
    serve(server, "a", FILES)
    assert_downloaded(tmp_path, fetch(server, tmp_path, ["a"]))


def test_default_table_covers_the_files_the_loader_reads():
    expected = {name + ".gz" for pair in data.IDX_FILES.values() for name in pair}
    assert set(MNIST_SHA256) == expected
    assert all(len(digest) == 64 and int(digest, 16) >= 0 for digest in MNIST_SHA256.values())
