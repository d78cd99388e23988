"""Where results and checkpoints go: a local folder, or any URI that `pyarrow.fs` understands (s3://bucket/prefix,
gs://bucket/prefix, hdfs://...).

A remote location is never written in place. Everything is written locally first, as for a local folder (metrics.csv
stays durable row by row), into a staging folder that mirrors the URI (`staging_dir`), and then uploaded: the driver's
files by a `FolderMirror` after each epoch's rows and at the end, each peer's checkpoints right after it saves them.
The same mapping turns a remote run folder into the local folder a resume reads it from.

Endpoint and credentials come from the standard environment variables (AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, ...): `pyarrow.fs.FileSystem.from_uri` reads
AWS_ENDPOINT_URL itself (checked with pyarrow 26.0.1; the constructor `S3FileSystem()` does not, so it is not used).
Importing this module loads no pyarrow: the config validates a URI's form with it, before anything heavy is imported.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from workers.core.errors import ConfigError

logger = logging.getLogger(__name__)

# The URI schemes pyarrow.fs.FileSystem.from_uri opens as a remote filesystem, and what it calls them.
REMOTE_SCHEMES = {"s3": "S3", "gs": "GCS", "gcs": "GCS", "hdfs": "HDFS", "viewfs": "HDFS", "abfs": "Azure",
                  "abfss": "Azure"}  # fmt: skip
BUCKET_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss")  # the first part of the path is a bucket (or container)
# What a peer on another node needs to reach the storage, forwarded from the driver's environment (swarm.py).
STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "GOOGLE_APPLICATION_CREDENTIALS")  # fmt: skip
RESULT_SUFFIXES = (".csv", ".yaml", ".yml", ".json")  # what `analyze` downloads of a folder (never checkpoints)


def is_remote(location: str | Path | None) -> bool:
    return isinstance(location, str) and urlsplit(location).scheme in REMOTE_SCHEMES and "://" in location


def check_location(value: str) -> str:
    """The config's check of a storage location's form (no I/O): a local path, file://, or a known remote scheme
    with a bucket. ValueError otherwise."""
    parts = urlsplit(value)
    if "://" not in value or parts.scheme == "file":
        return value
    if parts.scheme not in REMOTE_SCHEMES:
        known = ", ".join(f"{s}://" for s in REMOTE_SCHEMES)
        raise ValueError(f"unknown scheme {parts.scheme!r}: give a local folder or a URI of {known}")
    if not parts.netloc and parts.scheme in BUCKET_SCHEMES:
        raise ValueError(f"no bucket: expected {parts.scheme}://BUCKET/PREFIX")
    return value


def local_path(location: str | Path) -> Path:
    """A local location (a path or a file:// URI) as a path."""
    text = str(location)
    return Path(urlsplit(text).path if text.startswith("file://") else text)


def staging_dir(location: str | Path) -> Path:
    """The local folder that stands for `location`: the folder itself when it is local, else
    `~/.cache/gossip-launcher/staging/<scheme>/<bucket>/<prefix>` (XDG_CACHE_HOME is honoured)."""
    if not is_remote(location):
        return local_path(location).expanduser().resolve()
    parts = urlsplit(str(location))
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "gossip-launcher" / "staging" / parts.scheme / parts.netloc / parts.path.strip("/")


def join(location: str, *names: str) -> str:
    """`location` with `names` appended to its path (a query such as ?endpoint_override=... stays at the end)."""
    parts = urlsplit(location)
    path = "/".join([parts.path.rstrip("/"), *(name.strip("/") for name in names)])
    return urlunsplit(parts._replace(path=path))


def remote_of(storage: str, local_dir: Path) -> str | None:
    """Where the folder `local_dir` is uploaded to when results go to `storage`: None for local storage (nothing is
    copied); the same relative place under `storage` for a folder inside `staging_dir(storage)` (a run folder, a
    sweep's run folder); else `storage/<folder name>`."""
    if not is_remote(storage):
        return None
    local_dir = Path(local_dir).resolve()
    try:
        relative = local_dir.relative_to(staging_dir(storage)).as_posix()
    except ValueError:
        relative = local_dir.name
    return join(storage, relative)


def forwarded_env() -> dict[str, str]:
    """The storage settings of this process's environment that are set (for the peers' runtime_env)."""
    return {key: os.environ[key] for key in STORAGE_ENV if os.environ.get(key)}


# -- I/O ---------------------------------------------------------------------------------------------------------------


def filesystem(location: str):
    """(pyarrow filesystem, path in it) for a remote `location`; the filesystem is made once per bucket and
    environment (from_uri resolves the bucket's region with a request)."""
    parts = urlsplit(location)
    fs, base = _filesystem(urlunsplit(parts._replace(path="")), tuple(os.environ.get(k) for k in STORAGE_ENV))
    relative = parts.path.strip("/")
    base = base.rstrip("/")
    return fs, (f"{base}/{relative}" if base else f"/{relative}") if relative else (base or "/")


@functools.lru_cache(maxsize=16)
def _filesystem(root: str, _env: tuple):
    from pyarrow import fs

    return fs.FileSystem.from_uri(root)


def check_storage(location: str, field: str = "storage") -> None:
    """ConfigError naming `field` unless a remote `location` can be reached and its bucket exists (a local folder is
    made when the run starts). Run before Ray starts."""
    from pyarrow import fs as pafs

    if not is_remote(location):
        return
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    where = f" at {endpoint}" if endpoint and location.startswith("s3://") else ""
    try:
        filesys, path = filesystem(location)
        bucket = path.split("/")[0] if urlsplit(location).scheme in BUCKET_SCHEMES else path
        info = filesys.get_file_info(bucket)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ConfigError(f"{field}={location!r}: cannot be reached{where}: {err}") from None
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"{field}={location!r}: bucket {bucket!r} does not exist{where}; create it first")


def upload_file(local: Path, location: str) -> None:
    """Copy the local file to `location` (OSError on failure)."""
    from pyarrow import fs as pafs

    filesys, path = filesystem(location)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=filesys)


def download_file(location: str, local: Path) -> bool:
    """Copy `location` to `local` through a temporary file (a reader sees the old file or the new one); False when
    there is no such file."""
    from pyarrow import fs as pafs

    filesys, path = filesystem(location)
    if filesys.get_file_info(path).type != pafs.FileType.File:
        return False
    local.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.", suffix=".tmp")
    os.close(handle)
    try:
        pafs.copy_files(path, temp, source_filesystem=filesys, destination_filesystem=pafs.LocalFileSystem())
        os.replace(temp, local)
    finally:
        Path(temp).unlink(missing_ok=True)
    return True


def fetch(location: str, names: list[str], refresh: bool = True) -> tuple[Path, list[str]]:
    """Download the files `names` of the remote folder `location` into its `staging_dir` (those already there are
    kept when not `refresh`); (that folder, the names `location` does not have)."""
    folder, missing = staging_dir(location), []
    for name in names:
        target = folder / name
        if (refresh or not target.is_file()) and not download_file(join(location, name), target):
            missing.append(name)
    return folder, missing


def fetch_results(location: str, into: Path) -> Path:
    """The result files (csv, yaml) of a remote run or sweep folder, never its checkpoints, downloaded into the
    local folder `into`; FileNotFoundError when `location` holds none."""
    from pyarrow import fs as pafs

    filesys, path = filesystem(location)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    found = [info for info in filesys.get_file_info(selector) if info.is_file and info.path.endswith(RESULT_SUFFIXES)]
    if not found:
        raise FileNotFoundError(f"{location}: no results there (no metrics.csv, config.yaml, ...)")
    for info in found:
        target = into / info.path[len(path) :].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(info.path, str(target), source_filesystem=filesys,
                        destination_filesystem=pafs.LocalFileSystem())  # fmt: skip
    return into


def local_copies(paths: list[str], into: Path) -> tuple[list[str], dict[str, str]]:
    """`paths` with each storage URI replaced by a local copy of its result files in a folder of `into`, and
    {local copy: URI} (to name the runs by where they are)."""
    local, origins = [], {}
    for number, path in enumerate(map(str, paths)):
        if is_remote(path):
            copy = str(fetch_results(path, into / str(number)))
            local, origins[copy] = [*local, copy], path
        else:
            local.append(path)
    return local, origins


def upload_files(files: list[Path], local_dir: Path, location: str) -> list[str]:
    """Upload `files` (inside `local_dir`) to the same places under `location`; their URIs."""
    uris = [join(location, Path(file).relative_to(local_dir).as_posix()) for file in files]
    for file, uri in zip(files, uris, strict=True):
        upload_file(Path(file), uri)
    return uris


class FolderMirror:
    """Keeps a remote copy of a local folder's files (checkpoints aside: each peer uploads its own). `sync` uploads
    what changed since its last upload, at most every `min_interval_s` unless forced. A no-op without a remote.
    It is also one of the driver's sinks (launcher/results/sinks.py): the last one, so after each epoch's rows are
    written it uploads them and what the other sinks wrote."""

    def __init__(self, local_dir: Path, remote: str | None, min_interval_s: float = 5.0, top_level: bool = False):
        """`top_level`: only the folder's own files (a sweep's: its run folders upload themselves)."""
        self.local_dir, self.remote, self.min_interval_s = Path(local_dir), remote, min_interval_s
        self.top_level = top_level
        self._uploaded: dict[Path, tuple[int, int]] = {}  # file -> (size, mtime_ns) when it was last uploaded
        self._last_sync = -float("inf")
        self._interval = min_interval_s

    def sync(self, force: bool = False) -> bool:
        """Upload the changed files; False (logged) when an upload failed: the next sync tries again, after a pause
        that doubles with each failure (up to a minute: a storage that is down must not stall the driver)."""
        if self.remote is None or (not force and time.monotonic() - self._last_sync < self._interval):
            return True
        self._last_sync = time.monotonic()
        try:
            for path, stamp in self._changed():
                upload_file(path, join(self.remote, path.relative_to(self.local_dir).as_posix()))
                self._uploaded[path] = stamp
        except OSError as err:
            self._interval = min(2 * self._interval, 60.0)
            logger.error("could not upload %s to %s (the files are kept there): %s", self.local_dir, self.remote, err)
            return False
        self._interval = self.min_interval_s
        return True

    def finish(self, checkpoints: list[Path] = ()) -> bool:
        """The last upload, of everything that changed; then every one of `checkpoints` (the peers upload their own)
        must be in the storage: one that is not is uploaded from the local copy (the driver's, e.g. a final model
        fetched from another node). False, naming what is missing there, when something could not be uploaded."""
        uploaded = self.sync(force=True)
        if self.remote is None:
            return uploaded
        if not uploaded:  # the storage is out of reach: nothing can be checked there
            logger.error("missing in %s (their uploads failed): the run's files changed since the last upload, "
                         "and its checkpoints %s", self.remote, ", ".join(p.name for p in checkpoints))  # fmt: skip
            return False
        missing = [path.name for path in checkpoints if not self._in_storage(path)]
        if missing:
            logger.error("missing in %s (their uploads failed): %s", self.remote, ", ".join(missing))
        elif uploaded:
            logger.info("results: %s (uploaded from %s)", self.remote, self.local_dir)
        return uploaded and not missing

    def _in_storage(self, path: Path) -> bool:
        from pyarrow import fs as pafs

        remote = join(self.remote, path.name)
        try:
            filesys, where = filesystem(remote)
            if filesys.get_file_info(where).type == pafs.FileType.File:
                return True
            if path.is_file():
                upload_file(path, remote)
                return True
        except OSError as err:
            logger.error("could not upload %s to %s: %s", path, remote, err)
        return False

    def tick(self) -> None:
        """Called as rows and events are written: they reach the storage within `min_interval_s`."""
        self.sync()

    def epoch(self, rows: list) -> None:
        self.sync()

    def close(self, status: str) -> None:
        self.sync(force=True)

    def _changed(self) -> list[tuple[Path, tuple[int, int]]]:
        changed = []
        files = self.local_dir.glob("*") if self.top_level else self.local_dir.rglob("*")
        for path in sorted(p for p in files if p.is_file()):
            if path.suffix == ".pt" or path.name.startswith("."):  # checkpoints, and files being written atomically
                continue
            stat = path.stat()
            if self._uploaded.get(path) != (stamp := (stat.st_size, stat.st_mtime_ns)):
                changed.append((path, stamp))
        return changed
