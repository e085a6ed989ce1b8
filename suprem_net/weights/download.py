"""Download registry checkpoints into the weights cache.

The transfer uses ``requests`` with ``urllib3``'s ``Retry`` (connection errors and HTTP 429/5xx are
retried with exponential back-off); on top of it this module resumes a body that breaks off, with an
HTTP ``Range`` request from the bytes already on disk (``<cache>/.partial/<file>.part``, which also
survives an interrupted run). When the entry's URL fails, its mirror is tried. The SHA-256 is
computed while the bytes arrive; the file is checked (:func:`suprem_net.weights.cache.check_file`)
before it is renamed to its published name, and a file that fails the check is deleted. Every
failure is one ``SupremError`` line naming the URL.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import shutil
import time
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from suprem_net.errors import SupremError
from suprem_net.weights.cache import CHUNK, check_file, local_path, partial_path, place
from suprem_net.weights.registry import CheckpointEntry

logger = logging.getLogger(__name__)

RETRY_STATUS = (429, 500, 502, 503, 504)
TIMEOUT = (15.0, 60.0)  # seconds to connect, seconds between two reads
STREAM_CHUNK = 1 << 16  # bytes per read; a read cut short by a broken connection is lost, the rest is on disk


class _Interrupted(Exception):
    """The body broke off; ``offset`` bytes are on disk."""


def direct_url(url: str) -> str:
    """The URL that serves the file itself: a Dropbox share link ending ``dl=0`` opens a web page."""
    return re.sub(r"([?&])dl=0\b", r"\1dl=1", url) if "dropbox.com" in url else url


def make_session(retries: int, backoff: float) -> requests.Session:
    retry = Retry(total=retries, connect=retries, read=retries, status=retries, backoff_factor=backoff,
                  status_forcelist=RETRY_STATUS, allowed_methods=frozenset({"GET"}), raise_on_status=False)
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.headers.update({"Accept-Encoding": "identity", "User-Agent": "suprem_net"})  # byte offsets = file offsets
    return session


def _reason(e: BaseException) -> str:
    """A short cause for a requests exception (the errno text of a refused or unknown host)."""
    text = str(e)
    errno_text = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if isinstance(e, requests.Timeout):
        return "timed out"
    if errno_text:
        return f"cannot connect ({errno_text.group(1).strip()})"
    return f"{type(e).__name__}: {' '.join(text.split())[:160]}"


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total) of a ``Content-Range: bytes a-b/n`` (or ``bytes */n``) header."""
    m = re.match(r"bytes\s+(\d+|\*)-?\d*/(\d+|\*)", value or "")
    if not m:
        return None, None
    first = None if m.group(1) == "*" else int(m.group(1))
    return first, None if m.group(2) == "*" else int(m.group(2))


def _rehash(path: Path):
    """(SHA-256 object fed with the bytes of ``path``, their number)."""
    h = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
    return h, path.stat().st_size if path.is_file() else 0


def _get(session: requests.Session, url: str, offset: int, timeout) -> requests.Response:
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        return session.get(url, headers=headers, stream=True, timeout=timeout)
    except requests.RequestException as e:
        raise SupremError(f"download of {url} failed: {_reason(e)}") from None


def _attempt(session, url: str, part: Path, h, offset: int, timeout, progress: bool, label: str):
    """One request from ``offset``; returns ``(hash, bytes on disk)`` when the body is complete,
    raises :class:`_Interrupted` when it breaks off."""
    from tqdm import tqdm

    with _get(session, url, offset, timeout) as r:
        first, total = _content_range(r.headers.get("Content-Range"))
        if r.status_code == 416 and offset:  # asked for bytes after the end of the file
            if total == offset:  # ... because it is complete
                return h, offset
            logger.info("%s: the bytes on disk do not fit the file on the server; starting over", label)
            part.unlink()
            return _attempt(session, url, part, hashlib.sha256(), 0, timeout, progress, label)
        if r.status_code not in (200, 206):
            raise SupremError(f"download of {url} failed: HTTP {r.status_code} {r.reason or ''}".rstrip())
        if r.status_code == 200 or first != offset:  # the server sent the whole file: start over
            if offset:
                logger.info("%s: the server does not resume; starting over", label)
            h, offset = hashlib.sha256(), 0
            length = r.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        with open(part, "ab" if offset else "wb") as f, \
                tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                     disable=None if progress else True) as bar:
            try:
                for chunk in r.iter_content(STREAM_CHUNK):
                    f.write(chunk)
                    h.update(chunk)
                    offset += len(chunk)
                    bar.update(len(chunk))
            except requests.RequestException as e:
                raise _Interrupted(_reason(e)) from None
        if total is not None and offset < total:
            raise _Interrupted(f"connection closed after {offset:,} of {total:,} bytes")
        return h, offset


def fetch(url: str, part: Path, *, retries: int, backoff: float, timeout=TIMEOUT, progress: bool = True,
          label: str = "") -> str:
    """Download ``url`` to ``part``, continuing from the bytes already in ``part``; a body that breaks
    off is resumed up to ``retries`` times (waits ``backoff * 2**i`` s). Returns the SHA-256."""
    session = make_session(retries, backoff)
    h, offset = _rehash(part)
    if offset:
        logger.info("%s: resuming after %s bytes already downloaded", label, f"{offset:,}")
    for attempt in range(retries + 1):
        try:
            h, offset = _attempt(session, url, part, h, offset, timeout, progress, label or part.name)
            return h.hexdigest()
        except _Interrupted as e:
            h, offset = _rehash(part)  # the hash of exactly the bytes on disk
            if attempt == retries:
                raise SupremError(f"download of {url} failed: {e} (after {retries} retries; run the same command "
                                  f"again to resume from {offset:,} bytes)") from None
            logger.warning("%s: %s; resuming in %.1f s (%d/%d)", label, e, backoff * 2 ** attempt, attempt + 1, retries)
            time.sleep(backoff * 2 ** attempt)
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _exclusive(part: Path):
    """One download per file at a time (a second process would interleave its bytes)."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock
        yield
        return
    with open(part.with_name(part.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SupremError(f"{part}: another download of this file is running") from None
        yield


def _fetch_from_any(entry: CheckpointEntry, part: Path, **kwargs) -> tuple[str, str]:
    """``(url, SHA-256)`` from the entry's URL, else from its mirror (which continues the bytes on disk;
    the check after the download catches a mirror that serves another file)."""
    urls = [direct_url(u) for u in (entry.url, entry.mirror_url) if u]
    errors = []
    for url in urls:
        try:
            return url, fetch(url, part, label=entry.file, **kwargs)
        except SupremError as e:
            errors.append(str(e))
            if url != urls[-1]:
                logger.warning("%s; trying the mirror", e)
    raise SupremError("; ".join(errors))


def download(entry: CheckpointEntry, *, retries: int = 5, backoff: float = 1.0, progress: bool = True,
             timeout=TIMEOUT) -> Path:
    """Download ``entry``'s file into the cache (unless it is there) and return its path."""
    target = local_path(entry)
    if target.is_file():
        logger.info("%s: already in the cache: %s", entry.name, target)
        return target
    part = partial_path(entry)
    part.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(part):
        have = part.stat().st_size if part.is_file() else 0
        free = shutil.disk_usage(part.parent).free
        if entry.size is not None and entry.size - have > free:
            raise SupremError(f"download of {entry.url}: needs {entry.size - have:,} bytes, {free:,} free in "
                              f"{part.parent}")
        url, digest = _fetch_from_any(entry, part, retries=retries, backoff=backoff, timeout=timeout,
                                      progress=progress)
        try:
            check_file(entry, part, digest, f"download of {url}")
        except SupremError as e:
            part.unlink(missing_ok=True)
            raise SupremError(f"{e}; the download was deleted") from None
        path = place(entry, part, digest, move=True)
    logger.info("%s: %s (SHA-256 %s)", entry.name, path, digest)
    return path


def download_many(entries: list[CheckpointEntry], **kwargs) -> list[Path]:
    """Download each entry; failures do not stop the others and are raised together at the end
    (one line each)."""
    paths, errors = [], []
    for entry in entries:
        try:
            paths.append(download(entry, **kwargs))
        except SupremError as e:
            logger.debug("%s failed: %s", entry.name, e)
            errors.append(f"{entry.name}: {e}")
    if errors:
        raise SupremError("\n".join(errors))
    return paths
