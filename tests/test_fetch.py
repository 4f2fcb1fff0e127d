"""stages.ingest.fetch: every source kind, every failure code, retries, limits, threads."""

from __future__ import annotations

import hashlib
import pickle
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fsspec
import pytest

from http_fixtures import LocalHTTPServer, pattern_bytes
from stages.ingest.fetch import USER_AGENT, FetchError, FetchLimits, FetchResult, fetch, is_url

# Tiny backoff and timeouts keep the whole file fast; chunk_bytes small enough that a few KB
# exercise multi-chunk reads and the threaded hasher.
FAST = FetchLimits(retries=2, backoff_s=0.01, connect_timeout_s=2.0, read_timeout_s=2.0, chunk_bytes=1024)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(n: int, seed: int = 0) -> bytes:
    return bytes((i * 31 + seed) % 251 for i in range(n))


class Progress:
    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, n: int) -> None:
        self.calls.append(n)

    @property
    def total(self) -> int:
        return sum(self.calls)


def expect_error(source: str, dest: Path, limits: FetchLimits = FAST, **kw) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetch(source, dest, limits, **kw)
    assert not dest.exists(), "a failed fetch must not leave a partial dest"
    return info.value


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    return tmp_path / "out" / "dest.tmp"


# --- successes -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 1023, 1024, 2048, 2049, 3 * 1024 + 7, 50_000])
def test_local_ok(tmp_path: Path, dest: Path, size: int):
    # Sizes straddle chunk_bytes and the threaded-hasher threshold (2 chunks).
    data = payload(size)
    src = tmp_path / "Clip.MP4"
    src.write_bytes(data)
    progress = Progress()
    result = fetch(str(src), dest, FAST, on_bytes=progress)
    assert result == FetchResult(sha256=sha(data), bytes=size, source=str(src), suffix=".mp4")
    assert dest.read_bytes() == data
    assert progress.total == size and all(n > 0 for n in progress.calls)


def test_local_overwrites_dest_and_accepts_path_objects(tmp_path: Path, dest: Path):
    src = tmp_path / "a.webm"
    src.write_bytes(b"new content")
    dest.write_bytes(b"old content that is longer")
    result = fetch(src, dest, FAST)  # type: ignore[arg-type] - Path sources work too
    assert dest.read_bytes() == b"new content" and result.suffix == ".webm"


def test_file_url_ok(tmp_path: Path, dest: Path):
    data = payload(5000)
    src = tmp_path / "with space.mkv"
    src.write_bytes(data)
    url = "file://" + str(src).replace(" ", "%20")
    result = fetch(url, dest, FAST)
    assert (result.sha256, result.bytes, result.source, result.suffix) == (sha(data), 5000, url, ".mkv")


def test_memory_url_ok(dest: Path):
    data = payload(7000, seed=3)
    with fsspec.open("memory://fetch-test/v.avi", "wb") as f:
        f.write(data)
    try:
        result = fetch("memory://fetch-test/v.avi", dest, FAST)
    finally:
        fsspec.filesystem("memory").rm("memory://fetch-test", recursive=True)
    assert (result.sha256, result.bytes, result.suffix) == (sha(data), 7000, ".avi")
    assert dest.read_bytes() == data


def test_http_ok_sends_user_agent(http_server: LocalHTTPServer, dest: Path):
    data = payload(10_000)
    http_server.files["/v/a.MP4"] = data
    progress = Progress()
    result = fetch(http_server.url("/v/a.MP4?token=x"), dest, FAST, on_bytes=progress)
    assert (result.sha256, result.bytes, result.suffix) == (sha(data), 10_000, ".mp4")
    assert progress.total == 10_000
    method, _, headers = http_server.requests[0]
    assert method == "GET" and headers["User-Agent"] == USER_AGENT
    assert headers["Accept-Encoding"] == "identity"


@pytest.mark.parametrize("route", ["/big", "/big-declared"])
def test_http_streamed_bodies_ok(http_server: LocalHTTPServer, dest: Path, route: str):
    n = 3 * 2**20 + 123  # spans several server pieces and client reads
    result = fetch(http_server.url(f"{route}?bytes={n}"), dest, FetchLimits(backoff_s=0.01))
    assert result.bytes == n and result.sha256 == sha(pattern_bytes(n)) and result.suffix == ""


def test_bounded_redirects_ok(http_server: LocalHTTPServer, dest: Path):
    http_server.files["/a.mp4"] = b"redirected"
    result = fetch(http_server.url("/redirect/3/a.mp4"), dest, FetchLimits(max_redirects=3, backoff_s=0.01))
    assert dest.read_bytes() == b"redirected" and result.suffix == ".mp4"
    assert http_server.hits["/a.mp4"] == 1


def test_flaky_recovers_after_retries(http_server: LocalHTTPServer, dest: Path):
    http_server.files["/a.mp4"] = b"finally"
    result = fetch(http_server.url("/flaky/2/a.mp4"), dest, FAST)  # FAST.retries == 2
    assert dest.read_bytes() == b"finally" and result.bytes == 7
    assert http_server.hits["/flaky/2/a.mp4"] == 3


# --- failures ------------------------------------------------------------------------------


def test_not_found_local_file_url_and_memory(tmp_path: Path, dest: Path):
    for source in [str(tmp_path / "missing.mp4"), "file://" + str(tmp_path / "missing.mp4"), "memory://nope/missing.mp4"]:
        err = expect_error(source, dest)
        assert (err.code, err.retryable) == ("not_found", False)
        assert source in str(err) and "no such file" in str(err)


def test_local_directory_and_dest_failures(tmp_path: Path, dest: Path):
    err = expect_error(str(tmp_path), dest)
    assert (err.code, err.retryable) == ("io_error", False) and "directory" in str(err)
    src = tmp_path / "a.mp4"
    src.write_bytes(b"x")
    err = expect_error(str(src), tmp_path / "no-such-dir" / "dest.tmp", FetchLimits(retries=3, backoff_s=5.0))
    assert (err.code, err.retryable) == ("io_error", True) and "cannot write destination" in str(err)
    assert str(err).endswith("after 1 attempt")  # left to a later run: no 5 s backoff here


def test_dest_that_is_the_source_is_refused_and_kept(tmp_path: Path):
    src = tmp_path / "a.mp4"
    src.write_bytes(b"precious")
    with pytest.raises(FetchError) as info:
        fetch(str(src), src, FAST)
    assert info.value.code == "io_error" and src.read_bytes() == b"precious"


@pytest.mark.parametrize("kind", ["local", "memory", "http"])
def test_zero_bytes_is_empty_file(tmp_path: Path, dest: Path, http_server: LocalHTTPServer, kind: str):
    if kind == "local":
        (tmp_path / "e.mp4").write_bytes(b"")
        source = str(tmp_path / "e.mp4")
    elif kind == "memory":
        fsspec.filesystem("memory").pipe("/fetch-empty/e.mp4", b"")
        source = "memory://fetch-empty/e.mp4"
    else:
        http_server.files["/e.mp4"] = b""
        source = http_server.url("/e.mp4")
    err = expect_error(source, dest)
    assert (err.code, err.retryable) == ("empty_file", False)
    if kind == "http":
        assert http_server.hits["/e.mp4"] == 1


@pytest.mark.parametrize("kind", ["local", "memory", "http-declared", "http-chunked"])
def test_too_large(tmp_path: Path, dest: Path, http_server: LocalHTTPServer, kind: str):
    limits = FetchLimits(max_bytes=10_000, backoff_s=0.01, chunk_bytes=1024)
    if kind == "local":
        (tmp_path / "big.mp4").write_bytes(payload(10_001))
        source = str(tmp_path / "big.mp4")
    elif kind == "memory":
        fsspec.filesystem("memory").pipe("/fetch-big/big.mp4", payload(10_001))
        source = "memory://fetch-big/big.mp4"
    elif kind == "http-declared":
        source = http_server.url("/big-declared?bytes=50000000")
    else:
        source = http_server.url("/big?bytes=50000000")
    progress = Progress()
    err = expect_error(source, dest, limits, on_bytes=progress)
    assert (err.code, err.retryable) == ("too_large", False) and "max_bytes=10000" in str(err)
    assert progress.total == 0
    if kind == "http-declared":
        assert progress.calls == []  # refused from Content-Length, before reading the body
    if kind == "http-chunked":
        # Enforced while streaming: it stops within one read of crossing the limit.
        assert 10_000 < sum(n for n in progress.calls if n > 0) <= 10_000 + limits.chunk_bytes


@pytest.mark.parametrize("code", [400, 403, 404, 410, 451])
def test_http_4xx_not_retried(http_server: LocalHTTPServer, dest: Path, code: int):
    err = expect_error(http_server.url(f"/status/{code}"), dest)
    assert (err.code, err.retryable) == (f"http_{code}", False)
    assert http_server.hits[f"/status/{code}"] == 1
    assert str(err).startswith(http_server.url(f"/status/{code}") + f": HTTP {code} ")
    assert "attempt" not in str(err)


@pytest.mark.parametrize("code", [500, 502, 503, 408, 429])
def test_http_transient_retried_then_fails(http_server: LocalHTTPServer, dest: Path, code: int):
    err = expect_error(http_server.url(f"/status/{code}"), dest)
    assert (err.code, err.retryable) == (f"http_{code}", True)
    assert http_server.hits[f"/status/{code}"] == FAST.retries + 1
    assert str(err).endswith(f"after {FAST.retries + 1} attempts")


def test_http_500_message(http_server: LocalHTTPServer, dest: Path):
    url = http_server.url("/status/500")
    err = expect_error(url, dest, FetchLimits(retries=2, backoff_s=0.01))
    assert str(err) == f"{url}: HTTP 500 Internal Server Error after 3 attempts"


def test_no_retries_configured(http_server: LocalHTTPServer, dest: Path):
    err = expect_error(http_server.url("/status/503"), dest, FetchLimits(retries=0))
    assert err.retryable and str(err).endswith("after 1 attempt")
    assert http_server.hits["/status/503"] == 1


def test_flaky_beyond_retries_fails(http_server: LocalHTTPServer, dest: Path):
    http_server.files["/a.mp4"] = b"never reached"
    err = expect_error(http_server.url("/flaky/5/a.mp4"), dest)
    assert err.code == "http_500" and http_server.hits["/flaky/5/a.mp4"] == 3


def test_retry_after_is_honoured(http_server: LocalHTTPServer, dest: Path):
    start = time.monotonic()
    expect_error(http_server.url("/status/503?retry_after=1"), dest, FetchLimits(retries=1, backoff_s=0.01))
    assert time.monotonic() - start >= 1.0
    assert http_server.hits["/status/503"] == 2


def test_stall_times_out(http_server: LocalHTTPServer, dest: Path):
    progress = Progress()
    limits = FetchLimits(read_timeout_s=0.5, retries=1, backoff_s=0.01)
    start = time.monotonic()
    err = expect_error(http_server.url("/stall?seconds=5"), dest, limits, on_bytes=progress)
    elapsed = time.monotonic() - start
    assert (err.code, err.retryable) == ("timeout", True) and "stalled after 16 bytes" in str(err)
    assert str(err).endswith("after 2 attempts") and http_server.hits["/stall"] == 2
    assert elapsed < 3.0
    # The bytes of each failed attempt were reported, then taken back.
    assert progress.calls == [16, -16, 16, -16] and progress.total == 0


def test_stall_removes_existing_partial_dest(http_server: LocalHTTPServer, dest: Path):
    dest.write_bytes(b"left over from a crashed run")
    expect_error(http_server.url("/stall"), dest, FetchLimits(read_timeout_s=0.3, retries=0))


def test_total_deadline(http_server: LocalHTTPServer, dest: Path):
    # Bytes keep coming (no stall), but the whole download cannot finish within the deadline.
    limits = FetchLimits(total_timeout_s=0.6, read_timeout_s=2.0, retries=3, backoff_s=0.01)
    start = time.monotonic()
    err = expect_error(http_server.url("/trickle?bytes=100000&chunk=100&delay=0.02"), dest, limits)
    elapsed = time.monotonic() - start
    assert (err.code, err.retryable) == ("timeout", True) and "total deadline of 0.6 s" in str(err)
    assert elapsed < 1.5
    assert http_server.hits["/trickle"] == 1  # no time was left to retry


def test_redirect_loop(http_server: LocalHTTPServer, dest: Path):
    err = expect_error(http_server.url("/redirect-loop"), dest, FetchLimits(max_redirects=4, backoff_s=0.01))
    assert (err.code, err.retryable) == ("too_many_redirects", False)
    assert http_server.hits["/redirect-loop"] == 5


def test_too_many_bounded_redirects(http_server: LocalHTTPServer, dest: Path):
    http_server.files["/a.mp4"] = b"x"
    err = expect_error(http_server.url("/redirect/4/a.mp4"), dest, FetchLimits(max_redirects=3, backoff_s=0.01))
    assert err.code == "too_many_redirects" and http_server.hits["/a.mp4"] == 0


def test_connection_refused_is_retried(dest: Path):
    with socket.socket() as s:  # a port that was just free, so nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = expect_error(f"http://127.0.0.1:{port}/a.mp4", dest)
    assert (err.code, err.retryable) == ("connection", True)
    assert str(err).endswith(f"after {FAST.retries + 1} attempts")


@pytest.mark.parametrize("source", ["nosuchproto://x/a.mp4", "file://otherhost/a.mp4", "http://"])
def test_unsupported_url(dest: Path, source: str):
    err = expect_error(source, dest)
    assert (err.code, err.retryable) == ("unsupported_url", False)


def test_credentials_are_masked_in_messages(http_server: LocalHTTPServer, dest: Path):
    url = f"http://alice:hunter2@127.0.0.1:{http_server.port}/status/404?X-Amz-Signature=s3cr3t&part=1"
    err = expect_error(url, dest)
    assert "hunter2" not in str(err) and "s3cr3t" not in str(err)
    assert "alice:***@127.0.0.1" in str(err) and "part=1" in str(err)


def test_callback_error_propagates_and_removes_dest(tmp_path: Path, dest: Path):
    src = tmp_path / "a.mp4"
    src.write_bytes(payload(10_000))

    def boom(n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fetch(str(src), dest, FAST, on_bytes=boom)
    assert not dest.exists()


def test_fetch_error_pickles():
    err = pickle.loads(pickle.dumps(FetchError("http_503", "u: HTTP 503", retryable=True)))
    assert (err.code, str(err), err.retryable) == ("http_503", "u: HTTP 503", True)


def test_limits_are_validated():
    with pytest.raises(ValueError):
        FetchLimits(chunk_bytes=0)
    with pytest.raises(ValueError):
        FetchLimits(retries=-1)


# --- helpers and concurrency ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("/data/a.mp4", False),
        ("relative/clip:1.mp4", False),
        ("clip:1.mp4", False),
        ("C:\\videos\\a.mp4", False),
        ("C:/videos/a.mp4", False),
        ("file:///data/a.mp4", True),
        ("http://h/a.mp4", True),
        ("s3://bucket/a.mp4", True),
        ("memory://a.mp4", True),
        ("simplecache::s3://bucket/a.mp4", True),
    ],
)
def test_is_url(source: str, expected: bool):
    assert is_url(source) is expected


@pytest.mark.parametrize(
    ("source", "suffix"),
    [
        ("clip.MP4", ".mp4"),
        ("http://h/dir.d/a.webm?x=1.mp4#f.avi", ".webm"),
        ("http://h/download", ""),
        ("http://h/", ""),
        ("file:///data/a%20b.MKV", ".mkv"),
        ("simplecache::s3://bucket/a.mov", ".mov"),
        ("zip://inner/a.flv::s3://bucket/x.zip", ".flv"),
        ("weird.name with space", ""),
        ("trailing.", ""),
    ],
)
def test_suffix(source: str, suffix: str):
    from stages.ingest.fetch import _suffix

    assert _suffix(source) == suffix


def test_concurrent_fetches_from_threads(tmp_path: Path, http_server: LocalHTTPServer, dest: Path):
    sources: list[tuple[str, bytes]] = []
    for i in range(12):
        data = payload(20_000 + 997 * i, seed=i)
        http_server.files[f"/v{i}.mp4"] = data
        sources.append((http_server.url(f"/v{i}.mp4"), data))
        (tmp_path / f"l{i}.mp4").write_bytes(data)
        sources.append((str(tmp_path / f"l{i}.mp4"), data))
    http_server.files["/f.mp4"] = b"flaky body"
    sources.append((http_server.url("/flaky/1/f.mp4"), b"flaky body"))
    sources.append((http_server.url("/big?bytes=3000000"), pattern_bytes(3_000_000)))

    def one(item: tuple[int, tuple[str, bytes]]) -> tuple[FetchResult, bytes, Path]:
        i, (source, data) = item
        out = dest.parent / f"{i}.tmp"
        return fetch(source, out, FAST), data, out

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, enumerate(sources)))
    for result, data, out in results:
        assert result.sha256 == sha(data) and result.bytes == len(data)
        assert out.read_bytes() == data


def test_fixture_serves_head_and_counts_hits(http_server: LocalHTTPServer):
    import requests

    http_server.files["/a.mp4"] = b"12345"
    head = requests.head(http_server.url("/a.mp4"), timeout=5)
    assert head.status_code == 200 and head.headers["Content-Length"] == "5" and head.content == b""
    assert requests.get(http_server.url("/nothing-here"), timeout=5).status_code == 404
    assert http_server.hits == {"/a.mp4": 1, "/nothing-here": 1}
    http_server.reset()
    assert http_server.hits["/a.mp4"] == 0 and http_server.requests == []
