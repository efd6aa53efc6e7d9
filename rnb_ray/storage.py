"""Paths and object-store URIs: one ``(pyarrow.fs.FileSystem, path)`` for every place rnb-ray reads or writes.

* A local path (``data/corpus``, ``~/x``, ``/mnt/shared/x``, ``file:///x``) is :class:`LocalFileSystem` and
  the absolute path; the stages keep their plain-``os``/``Path`` code for it, so local behaviour is unchanged.
* A URI (``s3://bucket/prefix``, ``gs://bucket/prefix``, anything ``pyarrow.fs.FileSystem.from_uri``
  knows) is that filesystem and the path inside it (``bucket/prefix``).

S3-compatible stores (MinIO, Ceph, moto, R2, ...): pyarrow reads the standard AWS settings —
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``; e.g. ``http://minio:9000``), ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``~/.aws/*``, instance roles — and the URI may carry
options: ``s3://bucket/prefix?endpoint_override=minio:9000&scheme=http``. ``gs://`` goes through
pyarrow's GcsFileSystem the same way (``GOOGLE_APPLICATION_CREDENTIALS`` or the metadata server).

Ray tasks receive the filesystem *object* (pickled with its endpoint and options, not with credentials):
each worker authenticates through the same standard chain on its own node.

Built on this: :mod:`rnb_ray.files` finds input files, :mod:`rnb_ray.outputs` writes stage outputs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from rnb_ray.errors import RnbError

_CRED_FIX = ("check the URI, that the bucket exists, and the credentials/endpoint of the store "
             "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_ENDPOINT_URL for S3, GOOGLE_APPLICATION_CREDENTIALS "
             "for gs://)")


def is_uri(path: str | Path | None) -> bool:
    """True for ``scheme://...`` other than ``file://`` (which is a local path)."""
    if path is None or isinstance(path, Path):
        return False
    s = str(path)
    scheme, sep, _ = s.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme.lower() != "file"


def refuse_uris(command: str, paths: dict[str, str | Path | None]) -> None:
    """RnbError for the first object-store URI among ``{flag: path}`` of a command that needs local or
    shared paths (``rnb sweep``, ``rnb run``)."""
    for flag, value in paths.items():
        if is_uri(value):
            raise RnbError(f"{value} is an object-store URI; {command} reads and writes local or shared paths "
                           "only", where=flag, fix="copy the corpus to a filesystem every node sees (rnb "
                           "regroup, assign and train take s3:// / gs:// URIs)")


def _local(path: str | Path) -> str:
    s = str(path)
    if s.startswith("file://"):
        s = s[len("file://"):]
    return str(Path(s).expanduser().absolute())


def resolve(path: str | Path, what: str = "path") -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)``; an RnbError naming ``what`` when the URI cannot be used."""
    if not is_uri(path):
        return pafs.LocalFileSystem(), _local(path)
    uri = str(path)
    try:
        fs, inner = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError, OSError) as e:
        raise RnbError(f"cannot open {what} {uri}: {e}", where=uri,
                       fix="use a local path or a URI pyarrow supports (s3://bucket/prefix, gs://bucket/prefix)") from e
    return _with_env_credentials(fs), inner.rstrip("/")


def _with_env_credentials(fs: pafs.FileSystem) -> pafs.FileSystem:
    """An S3 filesystem that carries the ``AWS_*`` key variables of this process into Ray tasks.

    pyarrow pickles an S3FileSystem with its endpoint and options but without credentials it found
    itself, so a worker on another node (or started before the variables were set) would send
    unsigned requests. Keys set as environment variables here are made explicit so that they travel
    with the filesystem; without them each node uses its own chain (instance role, ``~/.aws``).
    """
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not isinstance(fs, pafs.S3FileSystem) or not key or not secret:
        return fs
    options = dict(fs.__reduce__()[1][0])
    if options.get("access_key") or options.get("anonymous") or options.get("role_arn"):
        return fs  # the URI chose its own credentials
    options.update(access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN"))
    try:
        return type(fs)._reconstruct(options)  # what unpickling calls: every option kept
    except (AttributeError, TypeError):  # pragma: no cover - a pyarrow without _reconstruct
        return pafs.S3FileSystem(access_key=key, secret_key=secret, session_token=options["session_token"],
                                 region=options.get("region") or None, scheme=options.get("scheme") or None,
                                 endpoint_override=options.get("endpoint_override") or None)


def strip_query(uri: str) -> str:
    """The URI without ``?options`` (for joining paths and for messages)."""
    return uri.split("?", 1)[0]


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a URI (options kept at the end) or a local path."""
    if not is_uri(base):
        return str(Path(base).joinpath(*parts))
    head, sep, query = base.partition("?")
    out = "/".join([head.rstrip("/"), *(p.strip("/") for p in parts)])
    return out + (sep + query if sep else "")


def bucket_of(fs: pafs.FileSystem, path: str) -> str | None:
    """The bucket of an object-store path (its first component), else None."""
    if isinstance(fs, pafs.LocalFileSystem):
        return None
    return path.split("/", 1)[0] or None


def access_error(action: str, shown: str, e: OSError) -> RnbError:
    """``cannot <action> <shown>``: an RnbError for a store operation that failed (credentials, endpoint, network)."""
    return RnbError(f"cannot {action} {shown}: {e}", where=shown, fix=_CRED_FIX)


def info(fs: pafs.FileSystem, path: str, uri: str, what: str) -> pafs.FileInfo:
    """``fs.get_file_info(path)`` with store errors (credentials, network) as an RnbError."""
    try:
        return fs.get_file_info(path)
    except OSError as e:
        raise access_error(f"access {what}", strip_query(uri), e) from e


def require_bucket(fs: pafs.FileSystem, path: str, uri: str, what: str) -> None:
    """An RnbError naming the URI when its bucket does not exist (rnb-ray never creates buckets)."""
    bucket = bucket_of(fs, path)
    if bucket is None:
        return
    if "/" not in path.strip("/") and what.startswith("output"):
        raise RnbError(f"{what} {strip_query(uri)} is a bucket, not a prefix inside one", where=strip_query(uri),
                       fix=f"write to a prefix, e.g. {join(uri, 'rnb-out')}")
    if info(fs, bucket, uri, what).type == pafs.FileType.NotFound:
        raise RnbError(f"bucket {bucket!r} of {what} {strip_query(uri)} does not exist (or is not visible with "
                       "these credentials)", where=strip_query(uri), fix="create the bucket first, or fix the URI")


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path, compression=None) as f:
        return f.read()


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path, compression=None) as f:
        f.write(data)


def list_files(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """Every file under ``path`` (recursive), sorted by path."""
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def relative_parts(root: str, path: str) -> tuple[str, ...]:
    """Components of ``path`` below ``root`` (both inside the same filesystem)."""
    rel = path[len(root.rstrip("/")):].lstrip("/") if path.startswith(root.rstrip("/")) else path
    return tuple(p for p in rel.split("/") if p)


def display_path(fs: pafs.FileSystem | None, path: str) -> str:
    """A path as users write it: local as is; ``s3://bucket/key`` / ``gs://bucket/key`` for stores."""
    if fs is None or isinstance(fs, pafs.LocalFileSystem):
        return path
    return f"{fs.type_name.replace('gcs', 'gs')}://{path}"
