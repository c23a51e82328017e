"""Where an experiment lives: a local path or a URI, read and written through ``pyarrow.fs``.

Every read and write of an experiment (``sweep.yaml``, the results fragments, the world
models, the scoring attempts, the trial listing, the report's inputs) goes through
:class:`Location`, on ``pyarrow.fs``, the layer Ray Tune uses for its own storage, so an
experiment may live on local disk or NFS (a path, ``file://``), on S3 or an S3-compatible
server (``s3://``), on GCS (``gs://``), or on anything ``pyarrow.fs.FileSystem.from_uri``
resolves::

    loc = Location.of("s3://bucket/results/fourrooms_demo")
    (loc / "sweep.yaml").read_text()
    for fragment in (loc / "worldmodels.parquet").list("trial=*-ckpt=*.parquet"): ...

A custom S3 endpoint (MinIO, Ceph, a test server) comes from the standard AWS environment
variables, as Tune's users set them: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (or ``AWS_PROFILE``), ``AWS_DEFAULT_REGION``.
pyarrow >= 15 reads the endpoint variables itself; :meth:`Location.of` passes them explicitly
as well, so the behaviour does not depend on the pyarrow version. A URI's own query
(``s3://bucket/x?endpoint_override=...``) wins over the environment.

Writes: on local disk a temporary file in the same folder, flushed to disk (``fsync``) and
renamed into place (readers see the old file or the new one, never half); on an object store
ONE PUT to the final key (objects appear whole or not at all; there is no rename, no fsync).

Errors: a missing file is ``FileNotFoundError``; every other ``OSError`` (permission, network,
credentials, a missing bucket while listing) propagates unchanged, so callers can tell "not
there" from "could not look". :func:`check_storage` turns a bad location into one
:class:`StorageError` line before any cluster work.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import posixpath
import re
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

__all__ = ["Location", "StorageError", "check_storage"]


class StorageError(ValueError):
    """A location that cannot hold an experiment (unknown scheme, missing bucket, no or invalid
    credentials, no permission); the message is one line naming what went wrong."""


# the environment variables that change how an s3:// URI resolves (part of the fs cache key)
_S3_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
           "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_REGION",
           "AWS_DEFAULT_REGION", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@functools.lru_cache(maxsize=64)
def _resolve_fs(base_uri: str, env: tuple) -> tuple[pafs.FileSystem, str]:
    """``FileSystem.from_uri`` (cached per URI and AWS environment: building an S3 client is
    not free), with the S3 endpoint of the environment when the URI names none."""
    del env  # part of the cache key only
    uri = base_uri
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme.lower() == "s3":
        query = urllib.parse.parse_qs(parsed.query)
        endpoint = _s3_endpoint()
        extra = {}
        if endpoint and "endpoint_override" not in query:
            # pyarrow takes the endpoint as host:port plus a scheme option
            ep = urllib.parse.urlsplit(endpoint)
            extra = {"endpoint_override": ep.netloc or ep.path}
            if ep.scheme:
                extra["scheme"] = ep.scheme
        if "allow_delayed_open" not in query:
            # a small file is then one PUT, not a multipart upload (start, part, finish)
            extra["allow_delayed_open"] = "true"
        if extra:
            sep = "&" if parsed.query else ""
            uri = urllib.parse.urlunsplit(parsed._replace(
                query=parsed.query + sep + urllib.parse.urlencode(extra)))
    return pafs.FileSystem.from_uri(uri)


@dataclass(frozen=True)
class Location:
    """One file or folder of an experiment: a filesystem, a path on it, and its URI.

    ``uri`` is what a user (and Tune's ``storage_path``) sees: the absolute local path on
    local disk, the URI (``s3://bucket/key``) elsewhere. ``path`` is the filesystem's own
    path (no scheme). Two locations are equal when their URIs are.
    """

    fs: pafs.FileSystem = field(compare=False, repr=False)
    path: str
    uri: str

    # ---------------------------------------------------------------- construction

    @classmethod
    def of(cls, x: "str | os.PathLike | Location") -> "Location":
        """A location from a local path (relative -> absolute, ``~`` expanded), a
        ``file://`` URI, or any URI ``pyarrow.fs.FileSystem.from_uri`` resolves.

        Raises:
            StorageError: an unknown scheme, or a path that looks like a URI cut short
                (``s3:/bucket``: never turned into a local folder named ``s3:``).
        """
        if isinstance(x, Location):
            return x
        text = os.fspath(x)
        if isinstance(text, bytes):
            text = os.fsdecode(text)
        text = str(text)
        if not text:
            raise StorageError("an empty location")
        match = _SCHEME.match(text)
        if match is None:
            first = text.split("/", 1)[0]
            if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]+:", first):
                raise StorageError(f"{text!r} looks like a URI with a missing slash "
                                   f"(write {first}//...); a local folder named {first!r} is never created")
            return cls._local(Path(text).expanduser().resolve())
        scheme = match.group(1).lower()
        if scheme == "file":
            parsed = urllib.parse.urlsplit(text)
            if parsed.netloc not in ("", "localhost"):
                raise StorageError(f"{text!r}: a file:// URI of another host ({parsed.netloc})")
            return cls._local(Path(urllib.parse.unquote(parsed.path)).expanduser().resolve())
        parsed = urllib.parse.urlsplit(text)
        base = urllib.parse.urlunsplit(parsed._replace(path=parsed.path.rstrip("/") or ""))
        try:
            fs, path = _resolve_fs(base, tuple(os.environ.get(k) for k in _S3_ENV))
        except (ValueError, TypeError) as exc:  # pyarrow.ArrowInvalid is a ValueError
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if "Unrecognized filesystem type" in message or "not supported" in message.lower():
                message = (f"unknown scheme {scheme + '://'!r} (a local path, file://, s3://, gs://, "
                           "or another URI pyarrow.fs resolves)")
            raise StorageError(f"{text}: {message}") from None
        path = path.rstrip("/")
        uri = cls._uri_for(scheme, path, parsed.query)
        return cls(fs=fs, path=path, uri=uri)

    @classmethod
    def _local(cls, path: Path) -> "Location":
        return cls(fs=_local_fs(), path=str(path), uri=str(path))

    @staticmethod
    def _uri_for(scheme: str, path: str, query: str) -> str:
        return f"{scheme}://{path}" + (f"?{query}" if query else "")

    def _with_path(self, path: str) -> "Location":
        if self.is_local:
            return Location(fs=self.fs, path=path, uri=path)
        query = urllib.parse.urlsplit(self.uri).query
        return Location(fs=self.fs, path=path, uri=self._uri_for(self.scheme, path, query))

    # ---------------------------------------------------------------- names

    def child(self, *parts: str) -> "Location":
        """The location ``parts`` below this one (each part may hold ``/``)."""
        names = [p for part in parts for p in str(part).split("/") if p not in ("", ".")]
        if ".." in names:
            raise ValueError(f"Location.child: '..' in {parts!r}")
        return self._with_path(posixpath.join(self.path, *names) if names else self.path)

    def __truediv__(self, name: str) -> "Location":
        return self.child(name)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    @property
    def parent(self) -> "Location":
        parent = posixpath.dirname(self.path.rstrip("/"))
        if self.is_local:
            parent = parent or "/"
        return self._with_path(parent)

    @property
    def scheme(self) -> str:
        """``"file"`` on local disk, else the URI's scheme (``s3``, ``gs``, ...)."""
        return "file" if self.is_local else self.uri.split("://", 1)[0]

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def local_path(self) -> Path | None:
        """The local path, or None on an object store."""
        return Path(self.path) if self.is_local else None

    def __str__(self) -> str:
        return self.uri

    def __fspath__(self) -> str:
        # lets a local location go where a path goes (open, Path, np.load); a remote one
        # must never become a local path (that is how a folder named "s3:" was born)
        if not self.is_local:
            raise TypeError(f"{self.uri} is not a local path (read it through qworld.sweep.location)")
        return self.path

    # ---------------------------------------------------------------- queries

    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def list(self, pattern: str = "*", *, kind: str | None = None) -> list["Location"]:
        """The children whose name matches ``pattern`` (a glob on the name), sorted by name;
        ``[]`` when this folder does not exist (but an ``OSError`` when its bucket does not:
        an object store would list that as empty too). ``kind``: ``"file"`` or ``"dir"`` to
        keep only those (no extra request)."""
        want = {None: None, "file": pafs.FileType.File, "dir": pafs.FileType.Directory}[kind]
        selector = pafs.FileSelector(self.path, recursive=False, allow_not_found=True)
        out = []
        for entry in self.fs.get_file_info(selector):
            name = posixpath.basename(entry.path.rstrip("/"))
            if not fnmatch.fnmatchcase(name, pattern) or name.startswith(".qworld-tmp-"):
                continue
            if want is not None and entry.type != want:
                continue
            out.append(self._with_path(entry.path.rstrip("/")))
        if not out and not self.is_local:
            # an object store lists a missing bucket as an empty folder: that is no answer
            bucket = self.path.split("/", 1)[0]
            if bucket and self.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise OSError(f"{self.uri}: bucket {bucket!r} does not exist")
        return sorted(out, key=lambda loc: loc.name)

    # ---------------------------------------------------------------- reading

    def read_bytes(self) -> bytes:
        """The whole file (``FileNotFoundError`` when it is not there)."""
        with self.fs.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    # ---------------------------------------------------------------- writing

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file at once, replacing it: on local disk a temporary file flushed
        to disk and renamed into place; on an object store one PUT to the final key."""
        data = bytes(data)
        if not self.is_local:
            with self.fs.open_output_stream(self.path) as out:
                out.write(data)
            return
        target = Path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".qworld-tmp-{target.name}.{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write_text(self, s: str, encoding: str = "utf-8") -> None:
        self.write_bytes(s.encode(encoding))

    def makedirs(self) -> None:
        """Create this folder and its parents (a no-op on object stores: no folders there)."""
        if self.is_local:
            self.fs.create_dir(self.path, recursive=True)

    def delete(self) -> None:
        """Delete this file, or this folder with everything in it (``FileNotFoundError`` when
        it is not there)."""
        info = self.info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{self.uri}: no such file or folder")
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        else:
            self.fs.delete_file(self.path)

    def move_to(self, dest: "Location | str | os.PathLike") -> "Location":
        """Move this file to ``dest`` on the same filesystem (local: a rename; an object
        store: a copy then a delete); returns ``dest``. ``FileNotFoundError`` when this file
        is gone (e.g. another process moved it first)."""
        dest = Location.of(dest)
        if dest.scheme != self.scheme:
            raise ValueError(f"Location.move_to: {self.uri} -> {dest.uri} crosses filesystems")
        if self.is_local:
            Path(dest.path).parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.path, dest.path)
        else:
            try:
                self.fs.move(self.path, dest.path)  # S3: CopyObject then DeleteObject
            except FileNotFoundError:
                raise
            except OSError as exc:
                if "NO_SUCH_KEY" in str(exc) or "NoSuchKey" in str(exc):
                    raise FileNotFoundError(f"{self.uri}: no such file (moved or deleted)") from None
                raise
        return dest


@functools.lru_cache(maxsize=1)
def _local_fs() -> pafs.LocalFileSystem:
    return pafs.LocalFileSystem()


# --------------------------------------------------------------------------------------
# probing a location before any cluster work

def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _aws_credentials_found() -> bool:
    """Whether the standard AWS credential chain has a source: environment keys, a profile or
    shared credentials file, web identity (EKS), container credentials (ECS), or an instance
    profile (EC2 metadata, unless ``AWS_EC2_METADATA_DISABLED``). botocore, when installed,
    answers for the whole chain."""
    try:
        import botocore.session  # noqa: PLC0415 - optional

        return botocore.session.Session().get_credentials() is not None
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - a broken profile: let the probe name it
        return True
    env = os.environ
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return True
    if env.get("AWS_WEB_IDENTITY_TOKEN_FILE") or env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") \
            or env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        return True
    for var, default in (("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
                         ("AWS_CONFIG_FILE", "~/.aws/config")):
        if Path(env.get(var, default)).expanduser().is_file():
            return True
    if env.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        return False
    import socket  # noqa: PLC0415

    try:  # the instance metadata service answers at once on EC2, nowhere else
        socket.create_connection(("169.254.169.254", 80), timeout=0.3).close()
        return True
    except OSError:
        return False


def _classify(exc: OSError) -> str:
    text = _one_line(exc)
    low = text.lower()
    if any(s in low for s in ("no_such_bucket", "nosuchbucket")):
        return f"the bucket does not exist ({text})"
    if any(s in low for s in ("invalidaccesskeyid", "signaturedoesnotmatch", "invalid_access_key",
                              "signature_does_not_match", "expiredtoken", "expired_token", "invalidtoken",
                              "invalid_token", "credential")):
        return f"invalid credentials ({text})"
    if any(s in low for s in ("access_denied", "accessdenied", "forbidden", "permission", " 403")):
        return f"permission denied ({text})"
    if any(s in low for s in ("network_connection", "could not connect", "couldn't connect",
                              "timed out", "resolve host", "connection refused")):
        return f"cannot reach the storage ({text})"
    return text


def check_storage(uri: "str | os.PathLike | Location") -> Location:
    """Resolve ``uri`` and probe it without creating anything; the :class:`Location`.

    Local: the path (or, when it does not exist yet, its nearest existing parent) must be a
    folder this process may write. Object store: credentials must be found (unless the URI
    asks for ``anonymous``), the bucket must exist and its prefix must be listable.

    Raises:
        StorageError: one line naming what went wrong.
    """
    loc = Location.of(uri)  # an unknown scheme raises StorageError here
    if loc.is_local:
        path = Path(loc.path)
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise StorageError(f"{loc.uri}: {probe} is a file, not a folder")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise StorageError(f"{loc.uri}: permission denied (cannot write in {probe})")
        return loc
    scheme = loc.scheme
    bucket = loc.path.split("/", 1)[0]
    if not bucket:
        raise StorageError(f"{loc.uri}: no bucket named (write {scheme}://BUCKET/PREFIX)")
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(loc.uri).query)
    anonymous = query.get("anonymous", ["false"])[0].lower() in ("1", "true", "yes")
    if scheme == "s3" and not anonymous and not _aws_credentials_found():
        raise StorageError(
            f"{loc.uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE; add ?anonymous=true for a public bucket)")
    try:
        info = loc.fs.get_file_info(bucket)
    except OSError as exc:
        detail = exc
        try:  # S3 answers a HEAD with a bare 403; a listing says why (bad key, signature, denied)
            loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False, allow_not_found=True))
        except OSError as listing:
            detail = listing
        raise StorageError(f"{loc.uri}: {_classify(detail)}") from None
    if info.type == pafs.FileType.NotFound:
        endpoint = f" at {_s3_endpoint()}" if scheme == "s3" and _s3_endpoint() else ""
        raise StorageError(f"{loc.uri}: bucket {bucket!r} does not exist{endpoint}")
    try:  # listing proves read access with these credentials (a HEAD may be allowed anonymously)
        loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False, allow_not_found=True))
    except OSError as exc:
        raise StorageError(f"{loc.uri}: {_classify(exc)}") from None
    return loc
