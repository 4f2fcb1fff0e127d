"""A local HTTP server for tests and benchmarks that need real sockets.

    with LocalHTTPServer({"/a.mp4": data}) as srv:
        fetch(srv.url("/a.mp4"), dest)
        assert srv.hits["/a.mp4"] == 1

It binds 127.0.0.1 on an ephemeral port and serves from a background thread (one thread per
connection, HTTP/1.1 keep-alive). `srv.files` may be changed while it runs. Routes:

| path                                 | response                                                  |
|--------------------------------------|-----------------------------------------------------------|
| any key of `files`                   | 200 with Content-Length (GET and HEAD; Range is ignored)   |
| `/status/<code>[?retry_after=S]`     | that status with a short body, optional Retry-After        |
| `/stall[?seconds=S&declared=N]`      | headers declaring N bytes, 16 bytes, then silence for S s  |
| `/trickle?bytes=N[&chunk=K&delay=S]` | N bytes in pieces of K every S s, with Content-Length      |
| `/redirect-loop`                     | 302 to itself                                              |
| `/redirect/<n>/<path>`               | n successive 302s, then whatever `/<path>` serves          |
| `/big?bytes=N`                       | N pattern bytes, chunked (no Content-Length)              |
| `/big-declared?bytes=N`              | N pattern bytes with Content-Length                       |
| `/flaky/<k>/<path>`                  | 500 for the first k hits, then whatever `/<path>` serves   |
| anything else                        | 404                                                        |

`pattern_bytes(n)` returns exactly what `/big` and `/big-declared` send, generated on the fly
so benchmarks can stream gigabytes without holding them. `srv.hits[path]` counts requests per
path (query string excluded); `srv.requests` lists (method, path with query, headers).

Sleeping routes (`/stall`, `/trickle`) never sleep longer than `max_sleep_s` in total and wake
at once when the server stops, so a test that fails early cannot hang on them.
"""

from __future__ import annotations

import mimetypes
import random
import socket
import sys
import threading
import time
from collections import Counter
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

__all__ = ["LocalHTTPServer", "http_server", "pattern_bytes"]

_PATTERN_BLOCK = 1 << 20


@lru_cache(maxsize=1)
def _pattern_block() -> bytes:
    # Pseudo-random rather than repeating short runs, so an offset bug changes the hash.
    return random.Random(20240601).randbytes(_PATTERN_BLOCK)


def _pattern_pieces(n: int, piece: int = _PATTERN_BLOCK):
    block = memoryview(_pattern_block())
    sent = 0
    while sent < n:
        start = sent % _PATTERN_BLOCK
        size = min(piece, n - sent, _PATTERN_BLOCK - start)
        yield block[start : start + size]
        sent += size


def pattern_bytes(n: int) -> bytes:
    """The first n bytes that `/big` and `/big-declared` serve."""
    return b"".join(bytes(p) for p in _pattern_pieces(n))


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a handler stuck in a write can never block interpreter exit
    allow_reuse_address = True

    def __init__(self, owner: LocalHTTPServer):
        self.owner = owner
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request, client_address) -> None:
        # Clients hang up mid-body on purpose (too_large, timeouts); that is not an error here.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    timeout = 60  # idle keep-alive connections end on their own; stop() ends them sooner

    def log_message(self, format, *args) -> None:
        pass  # tests assert on srv.hits / srv.requests instead of reading a log

    def setup(self) -> None:
        super().setup()
        self.server.owner._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._track(self.connection, False)

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _dispatch(self, head: bool) -> None:
        owner = self.server.owner
        parts = urlsplit(self.path)
        owner._record(self.command, self.path, parts.path, dict(self.headers))
        self._route(parts.path, parse_qs(parts.query), head)

    def _route(self, path: str, query: dict[str, list[str]], head: bool) -> None:
        owner = self.server.owner
        files = owner.files
        segments = path.strip("/").split("/")
        if path in files:
            self._send_body(200, bytes(files[path]), head, content_type=mimetypes.guess_type(path)[0])
        elif segments[0] == "status" and len(segments) == 2 and segments[1].isdigit():
            extra = {}
            if "retry_after" in query:
                extra["Retry-After"] = query["retry_after"][0]
            code = int(segments[1])
            self._send_body(code, f"status {code}\n".encode(), head, headers=extra)
        elif path == "/stall":
            self._stall(_num(query, "seconds", owner.max_sleep_s), int(_num(query, "declared", 1 << 20)), head)
        elif path == "/trickle":
            self._trickle(int(_num(query, "bytes", 1024)), int(_num(query, "chunk", 64)), _num(query, "delay", 0.05), head)
        elif path == "/redirect-loop":
            self._redirect(self.path)
        elif segments[0] == "redirect" and len(segments) >= 3 and segments[1].isdigit():
            n, rest = int(segments[1]), "/" + "/".join(segments[2:])
            suffix = "?" + urlsplit(self.path).query if urlsplit(self.path).query else ""
            if n == 0:
                self._route(rest, query, head)
            elif n == 1:
                self._redirect(rest + suffix)
            else:
                self._redirect(f"/redirect/{n - 1}{rest}{suffix}")
        elif path in ("/big", "/big-declared"):
            self._big(int(_num(query, "bytes", 1 << 20)), chunked=path == "/big", head=head)
        elif segments[0] == "flaky" and len(segments) >= 3 and segments[1].isdigit():
            if owner.hits[path] <= int(segments[1]):
                self._send_body(500, b"flaky failure\n", head)
            else:
                self._route("/" + "/".join(segments[2:]), query, head)
        else:
            self._send_body(404, b"not found\n", head)

    def _send_body(self, code: int, body: bytes, head: bool, *, content_type: str | None = None, headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type or "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _stall(self, seconds: float, declared: int, head: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(declared))
        self.end_headers()
        if head:
            return
        self.wfile.write(b"\0" * min(16, declared))
        self.wfile.flush()
        self.server.owner._sleep(seconds)
        # The body is short of its declared length, so the connection cannot be reused.
        self.close_connection = True

    def _trickle(self, n: int, chunk: int, delay: float, head: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(n))
        self.end_headers()
        if head:
            return
        owner = self.server.owner
        budget_end = time.monotonic() + owner.max_sleep_s
        for piece in _pattern_pieces(n, max(chunk, 1)):
            self.wfile.write(piece)
            self.wfile.flush()
            # Past the sleep budget the rest goes out at full speed, so no request outlives it.
            if owner._sleep(min(delay, budget_end - time.monotonic())):
                self.close_connection = True
                return

    def _big(self, n: int, *, chunked: bool, head: bool) -> None:
        self.send_response(200)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(n))
        self.end_headers()
        if head:
            return
        for piece in _pattern_pieces(n):
            if chunked:
                self.wfile.write(f"{len(piece):x}\r\n".encode())
                self.wfile.write(piece)
                self.wfile.write(b"\r\n")
            else:
                self.wfile.write(piece)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")


def _num(query: dict[str, list[str]], key: str, default: float) -> float:
    try:
        return float(query[key][0])
    except (KeyError, IndexError, ValueError):
        return default


class LocalHTTPServer:
    """A threaded HTTP server on 127.0.0.1:<ephemeral>; see the module docstring for routes."""

    def __init__(self, files: dict[str, bytes] | None = None, *, max_sleep_s: float = 5.0):
        self.files: dict[str, bytes] = dict(files or {})
        self.max_sleep_s = max_sleep_s
        self.hits: Counter[str] = Counter()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._conns: set[socket.socket] = set()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        """Absolute URL of `path` ("/a.mp4", "status/500", "/big?bytes=10")."""
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def reset(self) -> None:
        """Forget hits and requests (flaky routes start failing again)."""
        with self._lock:
            self.hits.clear()
            self.requests.clear()

    def start(self) -> LocalHTTPServer:
        self._stopping.clear()
        self._httpd = _Server(self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="LocalHTTPServer", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake sleeping handlers and drop open connections."""
        if self._httpd is None:
            return
        self._stopping.set()
        self._httpd.shutdown()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> LocalHTTPServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _record(self, method: str, raw_path: str, path: str, headers: dict[str, str]) -> None:
        with self._lock:
            self.hits[path] += 1
            self.requests.append((method, raw_path, headers))

    def _track(self, conn: socket.socket, alive: bool) -> None:
        with self._lock:
            if alive:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def _sleep(self, seconds: float) -> bool:
        """Sleep up to `seconds` (capped by max_sleep_s); True if the server is stopping."""
        return self._stopping.wait(min(max(seconds, 0.0), self.max_sleep_s))


@pytest.fixture
def http_server():
    """A started LocalHTTPServer with no files; add them with `http_server.files[path] = data`."""
    with LocalHTTPServer() as srv:
        yield srv
