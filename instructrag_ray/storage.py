"""Where the jobs read and write: local paths and object-store URIs (s3://, gs://, abfs://, hdfs://, ...),
through pyarrow's filesystems. A URI never becomes a local path.

`location(path_or_uri)` returns a `Location`: a pyarrow FileSystem and a path on it, with the few
operations the jobs need. Credentials and endpoints come from each store's standard environment and
config files (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for S3-compatible stores
such as MinIO or R2, GOOGLE_APPLICATION_CREDENTIALS, ...); nothing here reads them or logs them.

Writes are atomic for readers: a local file is written under a temporary name and renamed; an object is
built in memory and uploaded with one request (an object store shows an object only once its upload
completes, and a failed upload shows nothing; a half-written stream would be published on close, so
none is used for results).

`check_location` turns every way a location can be unusable (a scheme no installed filesystem serves, no
credentials, a bucket that does not exist, an endpoint that does not answer, a read-only directory) into
one line (`StorageError`) before any work. `node_local_copy` copies a directory at a URI once per node
to local disk (atomic, shared by the processes on the node, checked by a content fingerprint) for the
things that must be opened from local disk: the tantivy index and models.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .errors import JobError

_CACHE_ENV = "INSTRUCTRAG_CACHE"
# Messages for the schemes pyarrow serves, and what each needs.
_HINTS = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile or an instance role) and, for "
          "S3-compatible stores (MinIO, R2, Ceph), AWS_ENDPOINT_URL=http(s)://HOST:PORT",
    "gs": "set GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`",
    "abfs": "give the nodes an Azure identity (workload or managed identity, or AZURE_CLIENT_ID, AZURE_TENANT_ID, "
            "AZURE_CLIENT_SECRET); write "
            "abfs://CONTAINER@ACCOUNT.dfs.core.windows.net/PATH",
    "hdfs": "needs Java and libhdfs: set JAVA_HOME, HADOOP_HOME and CLASSPATH=$(hadoop classpath --glob)",
}
_HINTS.update(gcs=_HINTS["gs"], abfss=_HINTS["abfs"], viewfs=_HINTS["hdfs"])


class StorageError(JobError):
    """A path or URI that cannot be read or written as the job needs; one line naming it and the fix."""


def is_uri(path: str) -> bool:
    """True for 'scheme://...' (not for a local path, a Windows drive letter or file://)."""
    scheme = urlparse(str(path)).scheme
    return len(scheme) > 1 and scheme != "file"


@dataclass(frozen=True)
class Location:
    """A directory or file on a filesystem: `fs` (pyarrow), `path` on it, and `uri` as the user wrote it
    (absolute for local paths). Pickles to Ray workers (pyarrow filesystems do, endpoint included)."""

    fs: object
    path: str
    uri: str

    @property
    def local(self) -> bool:
        return not is_uri(self.uri)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        return Location(self.fs, self.path.rstrip("/").rsplit("/", 1)[0] or "/", self.uri.rstrip("/").rsplit("/", 1)[0])

    def __truediv__(self, part: str) -> Location:
        return Location(self.fs, f"{self.path.rstrip('/')}/{part}", f"{self.uri.rstrip('/')}/{part}")

    def __str__(self) -> str:
        return self.uri

    # --- what is there ---------------------------------------------------------------------------

    def info(self):
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self.info().type == pafs.FileType.Directory

    def files(self, suffixes: tuple[str, ...] = (), recursive: bool = False) -> list[Location]:
        """The files below this directory (sorted by path), ending in one of `suffixes` when given;
        names starting with '.' or '_' (temporary and staging files) are left out."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True)
        found = []
        base = self.path.rstrip("/")
        for info in self.fs.get_file_info(selector):
            relative = info.path[len(base):].lstrip("/")
            if info.type != pafs.FileType.File or any(p[:1] in "._" for p in relative.split("/")):
                continue
            if suffixes and not info.base_name.lower().endswith(suffixes):
                continue
            found.append(self / relative)
        return sorted(found, key=lambda loc: loc.path)

    def subdirs(self) -> list[Location]:
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.path, recursive=False, allow_not_found=True)
        return sorted((self / i.base_name for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.Directory),
                      key=lambda loc: loc.path)

    # --- reading and writing ---------------------------------------------------------------------

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_bytes(self, data: bytes) -> None:
        """Atomic for readers: a temporary name and a rename on a local disk, one upload on a store."""
        if self.local:
            target = Path(self.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
            return
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def write_parquet(self, table) -> None:
        """One Parquet file, built in memory, then written atomically (write_bytes)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.write_bytes(sink.getvalue().to_pybytes())

    def read_parquet(self, columns: list[str] | None = None):
        import pyarrow.parquet as pq

        return pq.read_table(self.path, filesystem=self.fs, columns=columns)

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def delete(self) -> None:
        """Remove this file or directory (recursively); nothing to do when it is not there."""
        import pyarrow.fs as pafs

        kind = self.info().type
        if kind == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif kind != pafs.FileType.NotFound:
            self.fs.delete_file(self.path)

    def move_to(self, target: Location) -> None:
        """A file to another name on the same filesystem: a rename on a local disk (atomic), a server-side
        copy then a delete on a store (the copy appears whole)."""
        if self.local:
            Path(target.path).parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path, target.path)
        else:
            self.fs.move(self.path, target.path)

    def download(self, local_dir: Path) -> None:
        """Copy this directory's files to local_dir (which must not exist yet)."""
        import pyarrow.fs as pafs

        local_dir.mkdir(parents=True)
        pafs.copy_files(self.path, str(local_dir), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())

    def upload_from(self, local_dir: Path) -> None:
        """Copy a local directory's files here (replacing what is there)."""
        import pyarrow.fs as pafs

        self.delete()
        if self.local:
            shutil.copytree(local_dir, self.path)
            return
        pafs.copy_files(str(local_dir), self.path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)


def location(path: str | os.PathLike | Location, key: str = "path") -> Location:
    """The Location of a local path or a URI; `key` names the config key in errors. Raises StorageError
    for a scheme that no installed filesystem serves."""
    if isinstance(path, Location):
        return path
    text = str(path)
    if not is_uri(text):
        import pyarrow.fs as pafs

        local = os.path.abspath(os.path.expanduser(text[7:] if text.startswith("file://") else text))
        return Location(pafs.LocalFileSystem(), local, local)
    scheme = urlparse(text).scheme.lower()
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        fs, fs_path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        if "Unrecognized filesystem type" in str(e) or "not supported" in str(e).lower():
            raise StorageError(f"{key}={text}: no installed filesystem serves {scheme}:// (pyarrow serves s3://, gs://, "
                               "abfs://, hdfs:// and local paths)") from None
        raise StorageError(f"{key}={text}: {_first_line(e)}; {_HINTS.get(scheme, 'check the URI')}") from None
    except (OSError, pa.ArrowException) as e:
        raise StorageError(f"{key}={text}: cannot open the {scheme}:// filesystem ({_first_line(e)}); "
                           f"{_HINTS.get(scheme, 'check the URI')}") from None
    return Location(fs, fs_path.rstrip("/"), text.rstrip("/"))


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def check_location(loc: Location, key: str, *, write: bool = False, hint: str = "") -> None:
    """Before any work: an input must exist; an output must be writable (a probe file is written and
    removed). One line (StorageError) for a missing bucket, refused credentials, an endpoint that does
    not answer, a read-only directory or a path that is a file."""
    import pyarrow as pa

    probe = _probe(loc)
    try:
        info = probe.info()
        if not write:
            if not probe.exists():
                raise StorageError(f"{key} {loc.uri} does not exist" + (f"; {hint}" if hint else ""))
            return
        import pyarrow.fs as pafs

        if info.type == pafs.FileType.File:
            raise StorageError(f"{key}={loc.uri} is a file; pass a directory")
        if probe.local:  # probe the nearest existing directory: a check (or a dry run) creates nothing
            while not os.path.exists(probe.path) and probe.parent.path != probe.path:
                probe = probe.parent
        test = probe / f".instructrag-write-test-{uuid.uuid4().hex[:8]}"
        test.write_bytes(b"")
        test.delete()
    except StorageError:
        raise
    except PermissionError as e:
        raise StorageError(f"{key}={loc.uri} is not writable ({_first_line(e)}); choose another location") from None
    except FileNotFoundError as e:
        raise StorageError(f"{key}={loc.uri}: {_missing(loc, e)}") from None
    except (OSError, pa.ArrowException) as e:
        raise StorageError(f"{key}={loc.uri}: {_store_problem(loc, e)}") from None


def _probe(loc: Location) -> Location:
    """The same location through a filesystem that gives up at once (the jobs' own keep retrying)."""
    if loc.local:
        return loc
    import pyarrow.fs as pafs

    scheme = urlparse(loc.uri).scheme.lower()
    if scheme == "s3" and isinstance(loc.fs, pafs.S3FileSystem):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        fs = pafs.S3FileSystem(endpoint_override=endpoint, region=loc.fs.region or None, connect_timeout=3,
                               request_timeout=10, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
        return Location(fs, loc.path, loc.uri)
    if scheme in ("gs", "gcs"):
        return Location(pafs.GcsFileSystem(retry_time_limit=datetime.timedelta(seconds=5)), loc.path, loc.uri)
    return loc


def _missing(loc: Location, e: BaseException) -> str:
    if loc.local:
        return f"a parent directory does not exist or is not a directory ({_first_line(e)})"
    return f"the bucket {loc.path.split('/', 1)[0]!r} does not exist ({_first_line(e)})"


def _store_problem(loc: Location, e: BaseException) -> str:
    text = str(e)
    scheme = urlparse(loc.uri).scheme.lower()
    hint = _HINTS.get(scheme, "check the URI")
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return f"the bucket {loc.path.split('/', 1)[0]!r} does not exist; create it or fix the URI"
    if any(s in text for s in ("ACCESS_DENIED", "INVALID_ACCESS_KEY", "SIGNATURE_DOES_NOT_MATCH", "403", "Forbidden",
                               "AuthenticationException", "credentials")):
        return f"access denied ({_first_line(e)}); {hint}"
    if any(s in text for s in ("NETWORK_CONNECTION", "curlCode", "Could not resolve", "Connection refused",
                               "UNAVAILABLE", "timed out")):
        return f"the store does not answer ({_first_line(e)}); check the endpoint (AWS_ENDPOINT_URL for S3-compatible stores) and the network"
    if loc.local:
        return f"not writable ({_first_line(e)}); choose another location"
    return f"{_first_line(e)}; {hint}"


# --- directories needed on local disk (the tantivy index, models) ------------------------------------


def cache_root() -> Path:
    return Path(os.environ.get(_CACHE_ENV) or "~/.cache/instructrag-ray").expanduser()


def node_local_copy(uri: str, kind: str, fingerprint: str = "") -> Path:
    """A local copy of the directory at `uri` on this node, made once and shared by every process here.

    The copy lands in <cache>/<kind>/<digest of the URI and fingerprint>/ by an atomic rename of a fully
    downloaded temporary directory, so processes racing to copy it agree and none reads a half copy. A
    changed `fingerprint` (the content's, recorded at build time) makes a new copy. A local path is
    returned as it is.
    """
    if not is_uri(uri):
        return Path(uri)
    digest = hashlib.sha256(f"{uri}|{fingerprint}".encode()).hexdigest()[:16]
    target = cache_root() / kind / digest
    if (target / ".complete").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=target.parent))
    try:
        shutil.rmtree(tmp)
        location(uri).download(tmp)
        (tmp / ".complete").write_text(json.dumps({"uri": uri, "fingerprint": fingerprint}))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / ".complete").is_file():  # lost the race to an incomplete copy: not possible
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def directory_fingerprint(root: Path, skip: tuple[str, ...] = ()) -> str:
    """sha256 over the relative path, size and content of every file below `root` (sorted), but the
    top-level files named in `skip`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and str(p.relative_to(root)) not in skip):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:32]


def dumps(value) -> bytes:
    return (json.dumps(value, indent=2, default=str) + "\n").encode("utf-8")

