"""Shards behind a URL: fetched on demand into a size-limited local shard cache, verified.

``data.path`` may be an fsspec URL of a folder holding ``train/`` and ``val/`` (``s3://``,
``gs://``, ``https://``, ...; each split with its ``manifest.json``) or a text file (local
or a URL) listing shard URLs, one a line (``#`` comments): a shard's split is the name of
the folder it lies in, and that split's ``manifest.json`` is read beside the first shard
listed for it. The manifest stays the contract: it gives every shard's sample count (so the
sample numbering, the resume cursor and the no-missing/no-duplicate guarantee are exactly
those of local shards, without fetching anything) and its sha256.

``ShardCache``: a shard is downloaded (streamed, hashed on the way) to a temporary file and
renamed to ``<sha256>.tar`` only when its bytes match the manifest, so a download that fails
half way or brings other bytes leaves nothing behind; it is retried ``RETRIES`` times, then
``ShardUnavailable`` names the URL and why. Files are content-addressed, so every process
of a machine shares them (renames are atomic). Past ``max_bytes`` the least recently used
shards are deleted (a reader that has one open keeps reading it). ``prefetch`` fetches the
shards of the next batches on background threads, ahead of the reader.

Credentials come from the back end's own places (``CREDENTIALS``: for ``s3://`` the AWS
variables or profile, for ``gs://`` Google's); a refused access says which to check, and no
message or log line holds a secret (``redact``: the secret variables' values, a presigned
URL's signature).

The cache folder and its limit are one per process: ``configure`` (the stage CLI calls it
with ``data.shard_cache``, ``data.shard_cache_gb`` and ``data.prefetch_shards``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .shards import ManifestError, ShardManifest, parse_manifest

log = logging.getLogger(__name__)

RETRIES = 3
CHUNK = 1 << 20


class ShardUnavailable(RuntimeError):
    """A shard file cannot be opened or fetched: an error of the data set, not a sample."""


def is_remote(path: str | os.PathLike) -> bool:
    text = str(path)
    return "://" in text or text.endswith(".txt") or ".txt#" in text  # list file (+ split)


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def _fs_open(url: str, mode: str = "rb"):
    import fsspec  # only remote data needs it

    # HTTP: one streamed GET (block_size 0), no range requests a plain server may not know.
    options = {"block_size": 0} if url.startswith(("http://", "https://")) else {}
    return fsspec.open(url, mode, **options).open()


# Environment variables whose values are secrets: never in a message or a log line.
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
# Where each back end looks for credentials, for the message of a refused access.
CREDENTIALS = {
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE / ~/.aws/credentials; "
    "AWS_ENDPOINT_URL_S3 for another S3 server",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS, or gcloud auth application-default login",
}
_REFUSED = re.compile(
    r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|Forbidden|ExpiredToken|"
    r"InvalidToken|NoCredentials|Unable to locate credentials|\b40[13]\b"
)
_SIGNED = re.compile(
    r"([?&](?:X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token|X-Goog-Signature|"
    r"X-Goog-Credential|Signature|sig|token)=)[^&\s'\"]+",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` without secrets: the values of ``SECRET_ENV`` and the signatures and tokens
    of a presigned URL's query string."""
    for name in SECRET_ENV:
        value = os.environ.get(name, "")
        if len(value) >= 8:
            text = text.replace(value, "***")
    return _SIGNED.sub(r"\1***", text)


def describe(err: BaseException, url: str) -> str:
    """A back end's error, readable and without secrets; a refused access says which
    credentials to check."""
    text = f"{type(err).__name__}: {err}"
    if isinstance(err, PermissionError) or _REFUSED.search(text):
        scheme = url.split("://", 1)[0] if "://" in url else ""
        where = CREDENTIALS.get(scheme, "the credentials of this back end")
        text += f" (access refused: check the credentials: {where})"
    return redact(text)


def read_text(url: str) -> str:
    try:
        with _fs_open(url, "rb") as f:
            return f.read().decode()
    except FileNotFoundError:
        raise ManifestError(f"{redact(url)} does not exist") from None
    except Exception as err:  # network back ends raise their own types
        # ``from None``: the back end's exception (and its arguments) stays out of the trace.
        raise ManifestError(f"cannot read {redact(url)}: {describe(err, url)}") from None


@dataclass(frozen=True)
class RemoteSplit:
    """A split's manifest and where each of its shards lies (a URL per shard, in order)."""

    where: str  # the URL (or list file + split) it was read from, for messages
    manifest: ShardManifest
    urls: tuple[str, ...]


def split_location(data_path: str, split: str) -> str:
    """``data.path`` + split -> what ``open_split`` takes (a folder URL, or list#split)."""
    if str(data_path).endswith(".txt"):
        return f"{data_path}#{split}"
    return join(str(data_path), split)


def open_split(location: str) -> RemoteSplit:
    """Read a remote split's manifest (and, for a list file, its shards' URLs)."""
    if "#" in location and location.split("#")[0].endswith(".txt"):
        listing, split = location.rsplit("#", 1)
        lines = [line.strip() for line in read_text(listing).splitlines()]
        urls = [u for u in lines if u and not u.startswith("#")]
        mine = {u.rstrip("/").rsplit("/", 1)[-1]: u for u in urls if _folder_name(u) == split}
        if not mine:
            raise ManifestError(f"{listing} lists no shard in a folder named {split!r}")
        first = next(u for u in urls if _folder_name(u) == split)
        base = first.rsplit("/", 1)[0]
        manifest = parse_manifest(
            read_text(join(base, "manifest.json")), join(base, "manifest.json")
        )
        missing = [s.name for s in manifest.shards if s.name not in mine]
        if missing:
            raise ManifestError(f"{listing} does not list {', '.join(missing[:3])} of {base}")
        return RemoteSplit(location, manifest, tuple(mine[s.name] for s in manifest.shards))
    url = join(location, "manifest.json")
    manifest = parse_manifest(read_text(url), url)
    return RemoteSplit(location, manifest, tuple(join(location, s.name) for s in manifest.shards))


def _folder_name(url: str) -> str:
    parts = url.rstrip("/").rsplit("/", 2)
    return parts[-2] if len(parts) >= 2 else ""


class ShardCache:
    """Content-addressed local copies of remote shards, at most ``max_bytes`` in all."""

    def __init__(self, folder: str | os.PathLike, max_bytes: int, prefetch_threads: int = 2):
        self.folder = Path(folder).expanduser()
        self.max_bytes = int(max_bytes)
        self.fetched = 0  # downloads completed by this process (for tests and benches)
        self.fetch_seconds = 0.0  # time spent in them
        self._lock = threading.Lock()
        self._inflight: dict[str, Future] = {}
        self._pool = ThreadPoolExecutor(max(1, prefetch_threads), thread_name_prefix="prefetch")
        self._pid = os.getpid()

    def path_of(self, sha256: str) -> Path:
        return self.folder / f"{sha256}.tar"

    def local(self, url: str, sha256: str) -> Path:
        """The verified local copy of ``url``, fetched first if absent (waits for a prefetch
        of it already running)."""
        path = self.path_of(sha256)
        if path.exists():
            os.utime(path)  # recently used
            return path
        future = self._submit(url, sha256) if os.getpid() == self._pid else None
        if future is not None:
            return future.result()
        return self._fetch(url, sha256)

    def prefetch(self, url: str, sha256: str) -> None:
        if os.getpid() != self._pid or self.path_of(sha256).exists():
            return  # a forked worker has no pool threads; the main process prefetches
        self._submit(url, sha256)

    def _submit(self, url: str, sha256: str) -> Future:
        with self._lock:
            future = self._inflight.get(sha256)
            if future is None:
                future = self._pool.submit(self._fetch, url, sha256)
                self._inflight[sha256] = future
                future.add_done_callback(lambda _: self._forget(sha256))
            return future

    def _forget(self, sha256: str) -> None:
        with self._lock:
            self._inflight.pop(sha256, None)

    def _fetch(self, url: str, sha256: str) -> Path:
        path = self.path_of(sha256)
        if path.exists():
            return path
        self.folder.mkdir(parents=True, exist_ok=True)
        problem = ""
        for attempt in range(1, RETRIES + 1):
            tmp = self.folder / f".{sha256}.{os.getpid()}.{threading.get_ident()}.tmp"
            started = time.perf_counter()
            try:
                digest = hashlib.sha256()
                with _fs_open(url) as src, open(tmp, "wb") as dst:
                    while block := src.read(CHUNK):
                        digest.update(block)
                        dst.write(block)
                if digest.hexdigest() != sha256:
                    problem = (
                        f"its bytes have sha256 {digest.hexdigest()}, the manifest says {sha256}"
                    )
                else:
                    os.replace(tmp, path)
                    self.fetch_seconds += time.perf_counter() - started
                    self.fetched += 1
                    self._evict(keep=path)
                    return path
            except PermissionError as err:  # trying again will not help
                raise ShardUnavailable(
                    f"cannot fetch shard {redact(url)}: {describe(err, url)}"
                ) from None
            except Exception as err:  # network back ends raise their own types
                problem = describe(err, url)
            finally:
                tmp.unlink(missing_ok=True)
            log.warning(
                "fetching %s failed (try %d of %d): %s", redact(url), attempt, RETRIES, problem
            )
        raise ShardUnavailable(f"cannot fetch shard {redact(url)} after {RETRIES} tries: {problem}")

    def _evict(self, keep: Path) -> None:
        """Delete least recently used shards until the folder fits ``max_bytes``."""
        files = []
        for p in self.folder.glob("*.tar"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue  # another process evicted it
            files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            if p != keep:
                p.unlink(missing_ok=True)
                total -= size


_cache: ShardCache | None = None
_settings = {"folder": "~/.cache/minisd/shards", "max_bytes": 20 << 30, "prefetch": 8}


def configure(folder: str = "", max_gb: float = 20.0, prefetch: int = 8) -> None:
    """Set this process's shard cache folder, its size limit and the prefetch depth."""
    global _cache
    _settings.update(folder=folder or "~/.cache/minisd/shards", max_bytes=int(max_gb * (1 << 30)))
    _settings["prefetch"] = max(0, int(prefetch))
    _cache = None


def shard_cache() -> ShardCache:
    global _cache
    if _cache is None:
        _cache = ShardCache(_settings["folder"], _settings["max_bytes"])
    return _cache


def prefetch_depth() -> int:
    return int(_settings["prefetch"])


class _Column:
    """``column[i]`` of a ``RemoteIndex``: resolved through sample i's shard table."""

    def __init__(self, index: RemoteIndex, part: int):
        self.index, self.part = index, part

    def __getitem__(self, i: int):
        keys, spans, row = self.index.table(int(i))
        return keys[row] if self.part < 0 else spans[row, self.part : self.part + 2]


class RemoteIndex:
    """What ``data.ShardIndex`` gives a reader, for a remote split, built lazily.

    The sample numbering comes from the manifest's counts alone (``shard`` is (N,) int32);
    a shard's member offsets are read from its tar headers when the shard is first fetched
    (``index_shard``, the local reader's function), checked against the manifest's count.
    """

    def __init__(self, split: RemoteSplit, index_shard):
        import numpy as np

        self.folder = split.where
        self.manifest = split.manifest
        self.urls = split.urls
        if self.manifest.num_samples == 0:
            raise ManifestError(f"{split.where}/manifest.json lists no samples")
        counts = [s.samples for s in self.manifest.shards]
        self.shard = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self._index_shard = index_shard
        self._tables: dict[int, tuple[list[str], np.ndarray]] = {}
        self.keys, self.image = _Column(self, -1), _Column(self, 0)
        self.txt, self.json = _Column(self, 2), _Column(self, 4)

    def __len__(self) -> int:
        return len(self.shard)

    def local_path(self, shard: int) -> str:
        info = self.manifest.shards[shard]
        return str(shard_cache().local(self.urls[shard], info.sha256))

    def table(self, i: int):
        """(keys, spans (n, 6) int64, row of sample i) of sample i's shard."""
        import numpy as np

        shard = int(self.shard[i])
        found = self._tables.get(shard)
        if found is None:
            rows = self._index_shard(Path(self.local_path(shard)))
            expected = self.manifest.shards[shard].samples
            if len(rows) != expected:
                raise ManifestError(
                    f"{self.urls[shard]} holds {len(rows)} samples but its manifest says "
                    f"{expected}: the shard was changed after the manifest was written"
                )
            spans = np.asarray([r[1:] for r in rows], dtype=np.int64).reshape(-1, 6)
            found = self._tables[shard] = ([r[0] for r in rows], spans)
        return found[0], found[1], i - int(self.starts[shard])

    def prefetch(self, indices: list[int]) -> None:
        """Start fetching the shards of these samples (the reader's next batches)."""
        import numpy as np

        for shard in np.unique(self.shard[np.asarray(indices, dtype=np.int64)]).tolist():
            self.prefetch_shard(shard)

    def prefetch_shard(self, shard: int) -> None:
        shard_cache().prefetch(self.urls[shard], self.manifest.shards[shard].sha256)
