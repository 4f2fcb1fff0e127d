"""Stream one source video to a local file while hashing it, with production limits.

`fetch(source, dest)` copies the bytes of `source` (a local path, a `file://` URL, an
`http(s)://` URL or any other fsspec URL such as `memory://` or `s3://`) to the caller's
temporary file `dest` and returns their sha256 and size, computed in the same pass: the data is
read once. The ingest stage then renames `dest` into the content-addressed raw store.

Every failure is a `FetchError` with a short machine `code`, a `retryable` flag and a message
that names the source and the cause. Retryable failures (5xx, 408, 429, timeouts, dropped
connections) are retried here with exponential backoff; whatever still fails is recorded by the
ingest stage and retried by a later pipeline run. After a failure `dest` does not exist.

The function keeps no shared state, so the ingest stage may call it from many threads at once.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import queue
import random
import re
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit
from urllib.request import url2pathname

import requests
import urllib3.exceptions

from stages.errors import StageError

__all__ = ["FetchError", "FetchLimits", "FetchResult", "fetch", "is_url", "local_path"]

USER_AGENT = "vimpac/0.1"

# Upper bound of one backoff sleep, whatever backoff_s, the attempt number or Retry-After say.
_MAX_BACKOFF_S = 30.0

# Local files bigger than this many chunks are hashed on a second thread while the first one
# reads and writes: sha256 alone runs at about the speed of read + write, so overlapping the
# two took a single 500 MB copy from ~1.1 to ~1.7 GB/s on an idle 2-core VM with SHA-NI,
# which is the speed of sha256 itself there (the bound for any one-pass copy-and-hash).
_PIPELINE_MIN_CHUNKS = 2

# A scheme is at least two characters (so "C:\\videos" stays a path) followed by "://" or by
# fsspec's chaining separator "::" ("simplecache::s3://..."). A bare "name:" prefix is not
# enough, because local file names may contain colons ("clip:1.mp4").
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:(//|:)")

# The suffix becomes part of a file name in the raw store, so only short alphanumeric
# extensions are kept; anything else ("a.b c", a trailing dot) yields "".
_SUFFIX_RE = re.compile(r"^\.[a-z0-9]{1,10}$")

# Query parameters whose values are credentials (presigned S3/GCS URLs, API tokens): they are
# masked in error messages, which end up in logs and in the catalog.
_SECRET_PARAM_RE = re.compile(r"sig|token|key|secret|credential|password|auth", re.IGNORECASE)


class FetchError(StageError):
    """A source could not be copied.

    `code` is a short machine code ("not_found", "http_404", "timeout", ...), `retryable` says
    whether a later attempt may succeed, and `str(err)` names the source and the cause.
    """

    def __init__(self, code: str, message: str, *, retryable: bool = False):
        super().__init__(code, message)
        self.retryable = retryable


@dataclass(frozen=True)
class FetchLimits:
    """Bounds on one `fetch` call. The defaults suit videos of up to 20 GiB over the network."""

    max_bytes: int = 20 * 2**30
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0  # a stall longer than this between bytes fails
    total_timeout_s: float = 3600.0  # whole call, all attempts and backoff sleeps included
    retries: int = 3  # extra attempts after the first, for retryable failures only
    backoff_s: float = 1.0  # sleep backoff_s * 2**n (+ up to 10% jitter), capped at 30 s
    max_redirects: int = 5
    chunk_bytes: int = 4 * 2**20

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.chunk_bytes < 1:
            raise ValueError("max_bytes and chunk_bytes must be positive")
        if min(self.connect_timeout_s, self.read_timeout_s, self.total_timeout_s) <= 0:
            raise ValueError("timeouts must be positive")
        if self.retries < 0 or self.backoff_s < 0 or self.max_redirects < 0:
            raise ValueError("retries, backoff_s and max_redirects must not be negative")


@dataclass(frozen=True)
class FetchResult:
    sha256: str  # hex digest of the bytes written to dest
    bytes: int
    source: str  # the source exactly as given
    suffix: str  # lowercase extension with its dot (".mp4"), "" if none


def is_url(source: str) -> bool:
    """True when `source` names a scheme ("s3://", "file://", "simplecache::..."), not a path."""
    return isinstance(source, str) and bool(_URL_RE.match(source))


def fetch(
    source: str,
    dest: str | Path,
    limits: FetchLimits = FetchLimits(),
    *,
    on_bytes: Callable[[int], None] | None = None,
) -> FetchResult:
    """Copy `source` to `dest` (created or overwritten) and return its sha256 and size.

    `on_bytes(n)` receives progress increments. When an attempt fails after writing some bytes,
    it receives the matching negative increment, so the running sum always equals the bytes in
    `dest` (and is 0 after a FetchError): a tqdm bar's `update` can be passed as is.

    Raises FetchError; `dest` is removed on any failure, including KeyboardInterrupt.
    A `Path` source is accepted too and reported as its string.
    """
    source = os.fspath(source)
    deadline = time.monotonic() + limits.total_timeout_s
    shown = _display(source)
    sink = _Sink(Path(dest), on_bytes)
    attempt = 0
    try:
        attempt_once = _backend(source)
        while True:
            attempt += 1
            try:
                size, digest = attempt_once(sink, limits, deadline)
                return FetchResult(sha256=digest, bytes=size, source=source, suffix=_suffix(source))
            except _Failure as failure:
                sink.discard()
                if not failure.retry_now or attempt > limits.retries:
                    raise _final_error(shown, failure, attempt) from failure.__cause__
                delay = _backoff(limits.backoff_s, attempt - 1, failure.retry_after)
                if time.monotonic() + delay >= deadline:
                    if "total deadline" not in failure.cause:
                        failure.cause += f" (no time left to retry within {limits.total_timeout_s:g} s)"
                    raise _final_error(shown, failure, attempt) from failure.__cause__
                time.sleep(delay)
    except _Failure as failure:
        raise _final_error(shown, failure, attempt) from failure.__cause__
    except BaseException:
        sink.discard(report=False)
        raise


class _Failure(Exception):
    """One failed attempt, before it is turned into the FetchError the caller sees."""

    def __init__(
        self,
        code: str,
        cause: str,
        *,
        retryable: bool = False,
        retry_now: bool | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(cause)
        self.code = code
        self.cause = cause
        self.retryable = retryable  # a later pipeline run may succeed
        self.retry_now = retryable if retry_now is None else retry_now  # worth retrying in this call
        self.retry_after = retry_after


def _final_error(shown: str, failure: _Failure, attempts: int) -> FetchError:
    message = f"{shown}: {failure.cause}"
    if failure.retryable or attempts > 1:
        message += f" after {attempts} attempt{'s' if attempts != 1 else ''}"
    return FetchError(failure.code, message, retryable=failure.retryable)


def _backoff(base: float, n: int, retry_after: float | None) -> float:
    delay = base * 2**n
    delay += random.uniform(0, 0.1 * delay)  # jitter: concurrent failures do not retry in step
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, _MAX_BACKOFF_S)


class _Sink:
    """The destination file of one call: opened per attempt, discarded on failure.

    It also keeps the progress reported to `on_bytes`, so a failed attempt can take it back.
    """

    def __init__(self, path: Path, on_bytes: Callable[[int], None] | None):
        self.path = path
        self._on_bytes = on_bytes
        self._opened = False
        self._reported = 0

    def open(self, buffering: int) -> BinaryIO:
        try:
            f = open(self.path, "wb", buffering=buffering)
        except OSError as e:
            raise _dest_failure(self.path, e) from e
        self._opened = True
        return f

    def report(self, n: int) -> None:
        if self._on_bytes is not None and n:
            self._reported += n
            self._on_bytes(n)

    def discard(self, *, report: bool = True) -> None:
        # Only a file this call created is removed: a dest that was never opened may be
        # something else (the source itself, when the caller passed the same path twice).
        if self._opened:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            except OSError:
                pass  # keep the original error; the caller's temp-dir cleanup gets the rest
            self._opened = False
        if report and self._reported:
            self._on_bytes(-self._reported)
        self._reported = 0


def _write(f: BinaryIO, data, path: Path) -> None:
    try:
        f.write(data)
    except OSError as e:
        raise _dest_failure(path, e) from e


def _dest_failure(path: Path, e: OSError) -> _Failure:
    # Not the source's fault (full disk, missing temp folder): a later run may succeed, but
    # retrying within this call would only fail again after the backoff sleeps.
    return _Failure("io_error", f"cannot write destination {path}: {e.strerror or e}", retryable=True, retry_now=False)


def _take(data: bytes, sha, out: BinaryIO, sink: "_Sink", total: int, limits: FetchLimits, deadline: float) -> int:
    """Hash, write and count one streamed chunk; returns the new byte total."""
    sha.update(data)
    _write(out, data, sink.path)
    total += len(data)
    sink.report(len(data))
    _check_progress(total, limits, deadline)
    return total


def _check_progress(total: int, limits: FetchLimits, deadline: float) -> None:
    if total > limits.max_bytes:
        raise _Failure("too_large", f"more than max_bytes={limits.max_bytes} bytes received")
    if time.monotonic() > deadline:
        raise _Failure("timeout", f"exceeded the total deadline of {limits.total_timeout_s:g} s", retryable=True)


def _check_size(size: int | None, limits: FetchLimits) -> None:
    if size == 0:
        raise _Failure("empty_file", "empty file (0 bytes)")
    if size is not None and size > limits.max_bytes:
        raise _Failure("too_large", f"{size} bytes is more than max_bytes={limits.max_bytes}")


# --- routing -------------------------------------------------------------------------------


def local_path(source: str) -> Path | None:
    """The filesystem path a source names (a plain path or a local file:// URL), else None."""
    if not is_url(source):
        return Path(source).expanduser()
    parts = urlsplit(source)
    if parts.scheme.lower() == "file" and "::" not in source and parts.netloc in ("", "localhost"):
        return Path(url2pathname(parts.path))
    return None


def _backend(source: str):
    """The attempt function for `source`; raises _Failure("unsupported_url") for odd URLs."""
    if not is_url(source):
        return lambda sink, limits, deadline: _fetch_local(source, sink, limits, deadline)
    parts = urlsplit(source)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        return lambda sink, limits, deadline: _fetch_http(source, sink, limits, deadline)
    if scheme == "file" and "::" not in source:
        if parts.netloc not in ("", "localhost"):
            raise _Failure("unsupported_url", f"file URL on a remote host {parts.netloc!r}")
        path = url2pathname(parts.path)
        return lambda sink, limits, deadline: _fetch_local(path, sink, limits, deadline)
    return lambda sink, limits, deadline: _fetch_fsspec(source, sink, limits, deadline)


def _suffix(source: str) -> str:
    if not is_url(source):
        suffix = Path(source).suffix
    else:
        # In a chained fsspec URL the leftmost part with a path names the file
        # ("zip://clip.mp4::s3://bucket/videos.zip"); "simplecache::s3://b/a.mp4" has none.
        suffix = ""
        for part in source.split("::"):
            path = unquote(urlsplit(part).path) if "://" in part else ""
            if path.strip("/"):
                suffix = PurePosixPath(path).suffix
                break
    suffix = suffix.lower()
    return suffix if _SUFFIX_RE.match(suffix) else ""


def _display(source: str) -> str:
    """The source for messages, with passwords and signature-like query values masked."""
    if not is_url(source):
        return source
    try:
        parts = urlsplit(source)
        netloc = parts.netloc
        if parts.password is not None:
            netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(_SECRET_PARAM_RE.search(k) for k, _ in pairs):
                query = urlencode([(k, "***" if _SECRET_PARAM_RE.search(k) else v) for k, v in pairs], safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:  # a malformed port or netloc: show it as given rather than fail
        return source


# --- local files ---------------------------------------------------------------------------


def _fetch_local(path: str, sink: _Sink, limits: FetchLimits, deadline: float) -> tuple[int, str]:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise _Failure("not_found", "no such file") from e
    except PermissionError as e:
        raise _Failure("io_error", "permission denied") from e
    except OSError as e:
        raise _Failure("io_error", f"cannot stat: {e.strerror or e}") from e
    if stat.S_ISDIR(st.st_mode):
        raise _Failure("io_error", "is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise _Failure("io_error", "not a regular file")
    _check_size(st.st_size, limits)
    try:
        if os.path.samestat(st, os.stat(sink.path)):
            raise _Failure("io_error", f"destination {sink.path} is the source file itself")
    except OSError:
        pass  # dest does not exist yet (the usual case)
    try:
        src = open(path, "rb", buffering=0)
    except PermissionError as e:
        raise _Failure("io_error", "permission denied") from e
    except OSError as e:
        raise _Failure("io_error", f"cannot open: {e.strerror or e}") from e

    pipelined = st.st_size > _PIPELINE_MIN_CHUNKS * limits.chunk_bytes
    if pipelined:
        hasher: _InlineHasher | _ThreadedHasher = _ThreadedHasher(limits.chunk_bytes)
    else:
        # Small files get a buffer of their own size (+1 so a file that grew is noticed):
        # zero-filling a 4 MiB buffer per tiny file would cost more than copying it.
        hasher = _InlineHasher(min(limits.chunk_bytes, st.st_size + 1))
    total = 0
    try:
        with src, hasher, sink.open(buffering=0) as out:
            while True:
                buf = hasher.free_buffer()
                try:
                    n = src.readinto(buf)
                except OSError as e:
                    # Mid-copy read errors are usually transient (network filesystems).
                    raise _Failure("io_error", f"read failed after {total} bytes: {e.strerror or e}", retryable=True) from e
                if not n:
                    break
                view = memoryview(buf)[:n]
                _write(out, view, sink.path)
                hasher.submit(buf, n)
                total += n
                sink.report(n)
                _check_progress(total, limits, deadline)
            digest = hasher.hexdigest()
    finally:
        hasher.close()
    if total == 0:  # truncated between stat and read
        raise _Failure("empty_file", "empty file (0 bytes)")
    return total, digest


class _InlineHasher:
    """One reusable buffer, hashed in the calling thread (small files)."""

    def __init__(self, chunk_bytes: int):
        self._buf = bytearray(chunk_bytes)
        self._sha = hashlib.sha256()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def free_buffer(self) -> bytearray:
        return self._buf

    def submit(self, buf: bytearray, n: int) -> None:
        self._sha.update(memoryview(buf)[:n])

    def hexdigest(self) -> str:
        return self._sha.hexdigest()

    def close(self) -> None:
        pass


class _ThreadedHasher:
    """Hashes submitted buffers on a helper thread while the caller reads and writes the next.

    Two buffers circulate: the caller fills and writes one while the helper hashes the other.
    hashlib and file I/O both release the GIL on large buffers, so the two really overlap. A
    buffer returns to the free queue only once hashed, and the caller has already written it
    before submitting, so no buffer is ever refilled while still in use.
    """

    def __init__(self, chunk_bytes: int, n_buffers: int = 2):
        self._sha = hashlib.sha256()
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._todo: queue.SimpleQueue[tuple[bytearray, int] | None] = queue.SimpleQueue()
        for _ in range(n_buffers):
            self._free.put(bytearray(chunk_bytes))
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="fetch-sha256", daemon=True)
        self._thread.start()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        while (item := self._todo.get()) is not None:
            buf, n = item
            self._sha.update(memoryview(buf)[:n])
            self._free.put(buf)

    def free_buffer(self) -> bytearray:
        return self._free.get()

    def submit(self, buf: bytearray, n: int) -> None:
        self._todo.put((buf, n))

    def hexdigest(self) -> str:
        self.close()
        return self._sha.hexdigest()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._todo.put(None)
            self._thread.join()


# --- HTTP ----------------------------------------------------------------------------------


def _fetch_http(url: str, sink: _Sink, limits: FetchLimits, deadline: float) -> tuple[int, str]:
    remaining = max(deadline - time.monotonic(), 0.001)
    # The read timeout bounds every wait for bytes (headers and body); clamping both to the
    # time left means a stall near the deadline fails at the deadline, not read_timeout later.
    timeout = (min(limits.connect_timeout_s, remaining), min(limits.read_timeout_s, remaining))
    # A Session per call: requests does not promise that a shared Session is thread-safe, and
    # a video download dwarfs the cost of one extra TCP/TLS handshake.
    with requests.Session() as session:
        session.max_redirects = limits.max_redirects
        # identity: the stored bytes must be the file itself, and Content-Length must count them.
        session.headers.update({"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
        try:
            resp = session.get(url, stream=True, timeout=timeout, allow_redirects=True)
        except requests.exceptions.TooManyRedirects as e:
            raise _Failure("too_many_redirects", f"more than {limits.max_redirects} redirects") from e
        except requests.exceptions.ConnectTimeout as e:
            raise _Failure("timeout", f"connect timed out after {timeout[0]:g} s", retryable=True) from e
        except requests.exceptions.ReadTimeout as e:
            raise _timeout_failure("waiting for the response", limits, deadline) from e
        except (requests.exceptions.InvalidSchema, requests.exceptions.InvalidURL, requests.exceptions.MissingSchema) as e:
            raise _Failure("unsupported_url", f"unsupported URL ({e})") from e
        except requests.exceptions.SSLError as e:
            # Certificate and protocol mismatches do not fix themselves between retries.
            raise _Failure("connection", f"TLS error: {_short(e)}") from e
        except requests.exceptions.RequestException as e:
            raise _Failure("connection", f"connection failed: {_short(e)}", retryable=True) from e
        with resp:
            return _read_http_body(resp, sink, limits, deadline)


def _read_http_body(resp: requests.Response, sink: _Sink, limits: FetchLimits, deadline: float) -> tuple[int, str]:
    status = resp.status_code
    if not 200 <= status < 300:
        reason = resp.reason or ""
        raise _Failure(
            f"http_{status}",
            f"HTTP {status} {reason}".rstrip(),
            retryable=status >= 500 or status in (408, 429),
            retry_after=_retry_after(resp.headers.get("Retry-After")),
        )
    declared = _content_length(resp)
    _check_size(declared, limits)

    sha = hashlib.sha256()
    total = 0
    raw = resp.raw
    # read1 returns after a single receive, so the deadline and max_bytes are checked as bytes
    # arrive; read(n) would block until n bytes came, letting a trickling server run past the
    # deadline. urllib3 < 2.2 has no read1: fall back to small reads there.
    read1 = getattr(raw, "read1", None)
    with sink.open(buffering=limits.chunk_bytes) as out:
        while True:
            try:
                if read1 is not None:
                    data = read1(limits.chunk_bytes, decode_content=True)
                else:
                    data = raw.read(min(limits.chunk_bytes, 2**16), decode_content=True)
            except urllib3.exceptions.ReadTimeoutError as e:
                raise _timeout_failure(f"stalled after {total} bytes", limits, deadline) from e
            except urllib3.exceptions.DecodeError as e:
                raise _Failure("io_error", f"cannot decode the response body: {_short(e)}") from e
            except (urllib3.exceptions.HTTPError, OSError) as e:
                raise _Failure("connection", f"connection broken after {total} bytes: {_short(e)}", retryable=True) from e
            if not data:
                break
            total = _take(data, sha, out, sink, total, limits, deadline)
    if total == 0:
        raise _Failure("empty_file", "empty response body (0 bytes)")
    if declared is not None and total != declared:
        raise _Failure("connection", f"got {total} of {declared} declared bytes", retryable=True)
    return total, sha.hexdigest()


def _content_length(resp: requests.Response) -> int | None:
    """The declared body size, when it counts the bytes we will store."""
    if resp.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
        return None  # it counts the encoded bytes; the decoded size is only known by reading
    try:
        value = int(resp.headers["Content-Length"])
    except (KeyError, ValueError):
        return None
    return value if value >= 0 else None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _timeout_failure(what: str, limits: FetchLimits, deadline: float) -> _Failure:
    if time.monotonic() >= deadline - 0.01:
        return _Failure("timeout", f"exceeded the total deadline of {limits.total_timeout_s:g} s", retryable=True)
    return _Failure("timeout", f"{what}: no data for {limits.read_timeout_s:g} s", retryable=True)


def _short(e: BaseException) -> str:
    """The innermost, most specific reason of a requests/urllib3 exception chain."""
    for _ in range(8):  # bounded: exception chains may be cyclic
        # requests wraps urllib3's MaxRetryError (.reason), which wraps NewConnectionError,
        # whose __cause__ is the OS error ("[Errno 111] Connection refused").
        inner = e.args[0] if e.args and isinstance(e.args[0], BaseException) else None
        reason = getattr(e, "reason", None)
        nxt = reason if isinstance(reason, BaseException) else inner or e.__cause__
        if nxt is None or nxt is e:
            break
        e = nxt
    text = str(e) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# --- other fsspec URLs ---------------------------------------------------------------------


def _fetch_fsspec(url: str, sink: _Sink, limits: FetchLimits, deadline: float) -> tuple[int, str]:
    import fsspec

    try:
        opened = fsspec.open(url, "rb")
        fs, path = opened.fs, opened.path
    except ImportError as e:
        raise _Failure("unsupported_url", f"unsupported URL: {e}") from e
    except ValueError as e:  # "Protocol not known"
        raise _Failure("unsupported_url", f"unsupported URL: {e}") from e
    except Exception as e:  # noqa: BLE001 - backends raise their own types; classify them
        raise _classify_fsspec(e, "cannot open") from e

    try:
        info = fs.info(path)
    except Exception as e:  # noqa: BLE001
        raise _classify_fsspec(e, "cannot stat") from e
    if info.get("type") == "directory":
        raise _Failure("io_error", "is a directory, not a file")
    size = info.get("size")
    _check_size(size if isinstance(size, int) else None, limits)

    sha = hashlib.sha256()
    total = 0
    try:
        src = fs.open(path, "rb")
    except Exception as e:  # noqa: BLE001
        raise _classify_fsspec(e, "cannot open") from e
    with src, sink.open(buffering=0) as out:
        while True:
            try:
                data = src.read(limits.chunk_bytes)
            except Exception as e:  # noqa: BLE001
                raise _classify_fsspec(e, f"read failed after {total} bytes") from e
            if not data:
                break
            total = _take(data, sha, out, sink, total, limits, deadline)
    if total == 0:
        raise _Failure("empty_file", "empty file (0 bytes)")
    return total, sha.hexdigest()


def _classify_fsspec(e: Exception, what: str) -> _Failure:
    """Map a backend's exception to a code; unknown errors are retryable (rerun-safe)."""
    if isinstance(e, _Failure):
        return e
    if isinstance(e, (FileNotFoundError, NotADirectoryError)):
        return _Failure("not_found", "no such file")
    if isinstance(e, PermissionError):
        return _Failure("io_error", f"{what}: permission denied")
    if isinstance(e, TimeoutError):
        return _Failure("timeout", f"{what}: timed out", retryable=True)
    if isinstance(e, ConnectionError):
        return _Failure("connection", f"{what}: {_short(e)}", retryable=True)
    return _Failure("io_error", f"{what}: {type(e).__name__}: {_short(e)}", retryable=True)
