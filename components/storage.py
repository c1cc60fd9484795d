"""One storage layer for local paths and ``s3://bucket/key`` URIs, used by every step.

S3 access goes through boto3 with the standard retry mode.  The endpoint (MinIO, moto, ...) and the
credentials come only from the standard AWS chain: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (boto3
reads them itself), the environment, ``~/.aws/config`` and ``~/.aws/credentials``, instance roles.  When a
custom endpoint is set in the environment, path-style addressing is used (what MinIO and moto expect).

Integrity: every upload carries a SHA-256 checksum that S3 verifies on receipt (per part for multipart
uploads) and our own ``sha256`` metadata; uploads and downloads are checked against them afterwards.
Local writes go to a temporary file in the same folder and are renamed into place, so a reader never
sees a half-written file.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import os
import posixpath
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Objects larger than this are uploaded in parts (S3 needs parts of at least 5 MiB).
DEFAULT_MULTIPART_THRESHOLD = 64 * 1024 * 1024
MIN_PART_SIZE = 5 * 1024 * 1024
#: File in a ``sync_down`` target that remembers the ETag and size of every object it downloaded.
SYNC_STATE_FILE = ".storage-sync.json"
_ENDPOINT_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
#: The environment variables that choose endpoint, credentials and region (a client is cached per combination).
_CLIENT_ENV: tuple[str, ...] = (*_ENDPOINT_VARS, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_CLIENT_ENV += ("AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE")


class StorageError(Exception):
    """A storage operation failed; the message names the URI and the cause."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """The file or S3 object does not exist."""


class BucketNotFound(StorageError, FileNotFoundError):
    """The S3 bucket does not exist (or is not visible with these credentials)."""


class UnsafePath(StorageError, ValueError):
    """A relative path that is absolute or climbs out of its root with ``..``."""


class ChecksumMismatch(StorageError):
    """Stored bytes differ from what was sent or announced."""


@dataclass(frozen=True)
class FileInfo:
    path: str
    """Path relative to the listed prefix, with ``/`` separators."""
    size: int
    """Bytes."""
    etag: str | None
    """S3 ETag without quotes (None for local files)."""


def is_s3(uri: str | os.PathLike[str]) -> bool:
    """True for ``s3://bucket/key`` URIs."""
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri}")
    return bucket, key


def join(uri: str | os.PathLike[str], *parts: str) -> str:
    """Join path parts onto a local path or an S3 URI (always ``/`` inside S3 keys)."""
    if not is_s3(uri):
        return str(Path(uri, *parts))
    out = str(uri).rstrip("/")
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def safe_relative(rel: str) -> str:
    """Normalise a relative path; raise :class:`UnsafePath` if it is absolute or escapes its root."""
    text = str(rel).replace("\\", "/")
    norm = posixpath.normpath(text) if text else ""
    drive = len(norm) > 1 and norm[1] == ":"  # C:foo on Windows-made lists
    if not norm or norm == "." or text.startswith("/") or norm == ".." or norm.startswith("../") or drive:
        raise UnsafePath(f"path {rel!r} is empty, absolute or outside the root")
    return norm


def child(root: str, rel: str) -> str:
    """``join(root, rel)`` after checking with :func:`safe_relative` that ``rel`` stays inside ``root``."""
    return join(root, safe_relative(rel))


def has_symlink(root: str, rel: str) -> bool:
    """True if ``rel`` (or any folder between ``root`` and it) is a symbolic link.  Always False on S3."""
    if is_s3(root):
        return False
    path = Path(root)
    for part in Path(safe_relative(rel)).parts:
        path = path / part
        if path.is_symlink():
            return True
    return False


@functools.lru_cache(maxsize=8)
def _cached_client(env_key: tuple[str | None, ...]) -> Any:
    import boto3
    from botocore.config import Config

    custom_endpoint = any(env_key[: len(_ENDPOINT_VARS)])
    config = Config(
        retries={"mode": "standard", "max_attempts": 5},
        s3={"addressing_style": "path"} if custom_endpoint else None,
        max_pool_connections=32,
    )
    return boto3.session.Session().client("s3", config=config)


def s3_client() -> Any:
    """A boto3 S3 client (standard retries; endpoint and credentials from the standard AWS chain).

    Clients are cached per combination of the AWS environment variables that select the endpoint,
    credentials and region, so a changed environment (tests, a new profile) gets a fresh client.
    """
    return _cached_client(tuple(os.environ.get(n) for n in _CLIENT_ENV))


def _s3_error(exc: Exception, uri: str) -> Exception:
    """Turn a botocore ClientError into ObjectNotFound / BucketNotFound / StorageError with the URI."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return StorageError(f"{uri}: {exc}")
    code = str(exc.response.get("Error", {}).get("Code", ""))
    if code == "NoSuchBucket":
        return BucketNotFound(f"S3 bucket of {uri} does not exist")
    if code in ("NoSuchKey", "404", "NotFound"):
        # HEAD answers a bare 404 for a missing bucket too: tell the two apart.
        bucket, _ = split_s3(uri)
        try:
            s3_client().head_bucket(Bucket=bucket)
        except ClientError:
            return BucketNotFound(f"S3 bucket {bucket!r} (of {uri}) does not exist or is not accessible")
        return ObjectNotFound(f"no such S3 object: {uri}")
    return StorageError(f"{uri}: {code}: {exc}")


@contextlib.contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Re-raise anything but our own errors as ObjectNotFound / BucketNotFound / StorageError naming ``uri``."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        raise _s3_error(exc, uri) from exc


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _part_size(size: int, threshold: int) -> int:
    """The part size the transfer manager will use for a file of ``size`` bytes (it may enlarge it)."""
    from s3transfer.utils import ChunksizeAdjuster

    return ChunksizeAdjuster().adjust_chunksize(max(threshold, MIN_PART_SIZE), size)


def _digests(path: Path, part_size: int) -> tuple[str, str, str]:
    """(sha256 hex, SHA-256 composite checksum of the parts (base64), multipart ETag) of a local file."""
    full, part_sha, part_md5 = hashlib.sha256(), [], []
    with open(path, "rb") as fh:
        while chunk := fh.read(part_size):
            full.update(chunk)
            part_sha.append(hashlib.sha256(chunk).digest())
            part_md5.append(hashlib.md5(chunk, usedforsecurity=False).digest())
    composite = _b64(hashlib.sha256(b"".join(part_sha)).digest())
    etag = hashlib.md5(b"".join(part_md5), usedforsecurity=False).hexdigest() + f"-{len(part_md5)}"
    return full.hexdigest(), composite, etag


def atomic_write_local(path: Path, write: Callable[[Any], None]) -> None:
    """Write through ``write(fileobj)`` into a temporary file next to ``path``, fsync, then rename it into place.

    A crash leaves either the old file or the new one, never a mix; the temporary file is removed on error, and
    the folder is fsynced after the rename so the new name survives a power loss.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_bytes(uri: str) -> bytes:
    """The whole file or object; S3 reads are checked against the stored checksum where there is one."""
    if not is_s3(uri):
        try:
            return Path(uri).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"no such file: {uri}") from None
    bucket, key = split_s3(uri)
    with _s3_errors(uri):
        # ChecksumMode makes botocore verify a full-object checksum while streaming the body.
        resp = s3_client().get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        data = resp["Body"].read()
    want = resp.get("Metadata", {}).get("sha256")
    if want and hashlib.sha256(data).hexdigest() != want:
        raise ChecksumMismatch(f"{uri}: downloaded bytes do not match the stored sha256")
    return data


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` atomically (local: temporary file + rename; S3: one PUT that S3 checks by SHA-256)."""
    if not is_s3(uri):
        atomic_write_local(Path(uri), lambda fh: fh.write(data))
        return
    bucket, key = split_s3(uri)
    digest = hashlib.sha256(data)
    with _s3_errors(uri):
        s3_client().put_object(
            Bucket=bucket,
            Key=key,
            Body=data,
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=_b64(digest.digest()),  # S3 and MinIO refuse the PUT if the body does not match
            Metadata={"sha256": digest.hexdigest()},  # what read_bytes and download_file check against
        )


def exists(uri: str) -> bool:
    """True if the file / object exists (a missing bucket raises :class:`BucketNotFound`)."""
    if not is_s3(uri):
        return Path(uri).is_file()
    bucket, key = split_s3(uri)
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except Exception as exc:
        err = _s3_error(exc, uri)
        if isinstance(err, ObjectNotFound):
            return False
        raise err from exc


def delete(uri: str) -> None:
    """Remove a file / object; missing ones are fine."""
    if not is_s3(uri):
        Path(uri).unlink(missing_ok=True)
        return
    bucket, key = split_s3(uri)
    with _s3_errors(uri):
        s3_client().delete_object(Bucket=bucket, Key=key)


def list_file_info(prefix: str) -> Iterator[FileInfo]:
    """Every file below ``prefix`` (recursive), relative to it, with size and ETag.  Missing prefix: nothing."""
    if not is_s3(prefix):
        root = Path(prefix)
        if root.is_file():
            raise StorageError(f"{prefix} is a file, not a folder")
        for dirpath, _dirs, files in sorted(os.walk(root)):
            for name in sorted(files):
                path = Path(dirpath, name)
                yield FileInfo(path.relative_to(root).as_posix(), path.lstat().st_size, None)
        return
    bucket, key = split_s3(prefix)
    key = key.rstrip("/") + "/" if key else ""
    with _s3_errors(prefix):
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", []):
                if not obj["Key"].endswith("/"):  # folder placeholder objects made by some tools
                    yield FileInfo(obj["Key"][len(key) :], obj["Size"], obj.get("ETag", "").strip('"') or None)


def list_files(prefix: str) -> Iterator[str]:
    """Relative paths / keys of every file below ``prefix``, recursively."""
    return (info.path for info in list_file_info(prefix))


def list_dir(prefix: str) -> list[str]:
    """Names of the files directly inside ``prefix`` (not recursive; folders are left out)."""
    if not is_s3(prefix):
        root = Path(prefix)
        return sorted(p.name for p in root.iterdir() if p.is_file()) if root.is_dir() else []
    bucket, key = split_s3(prefix)
    key = key.rstrip("/") + "/" if key else ""
    names: list[str] = []
    with _s3_errors(prefix):
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key, Delimiter="/")
        for page in pages:
            names += [o["Key"][len(key) :] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    return sorted(names)


def _transfer_config(threshold: int) -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=threshold, multipart_chunksize=max(threshold, MIN_PART_SIZE))


def upload_file(local_path: str | Path, uri: str, *, multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD) -> None:
    """Upload a local file (multipart above ``multipart_threshold``), then verify size and SHA-256 checksum.

    A local ``uri`` is an atomic copy.  S3 checks each part against its SHA-256 on receipt; afterwards
    the object's checksum (full, or composite over the parts) is compared with the local file's.
    """
    local_path = Path(local_path)
    if not local_path.is_file():
        raise ObjectNotFound(f"no such local file to upload: {local_path}")
    if not is_s3(uri):
        with open(local_path, "rb") as src:
            atomic_write_local(Path(uri), lambda fh: _copy(src, fh))
        return
    size = local_path.stat().st_size
    multipart = size >= multipart_threshold
    part = _part_size(size, multipart_threshold) if multipart else max(size, 1)
    sha_hex, composite, _ = _digests(local_path, part)
    bucket, key = split_s3(uri)
    client = s3_client()
    extra = {"ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": sha_hex}}
    with _s3_errors(uri):
        client.upload_file(str(local_path), bucket, key, ExtraArgs=extra, Config=_transfer_config(multipart_threshold))
        head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    got = str(head.get("ChecksumSHA256") or "").split("-")[0]
    full_b64 = _b64(bytes.fromhex(sha_hex))
    if head["ContentLength"] != size or (got and got not in (full_b64, composite)):
        client.delete_object(Bucket=bucket, Key=key)
        raise ChecksumMismatch(f"{uri}: uploaded object does not match {local_path} (size or SHA-256); removed it")


def _copy(src: Any, dst: Any, bufsize: int = 1 << 20) -> None:
    while chunk := src.read(bufsize):
        dst.write(chunk)


def download_file(uri: str, local_path: str | Path) -> Path:
    """Download to ``local_path`` (temporary file + rename), verified against the stored SHA-256."""
    local_path = Path(local_path)
    if not is_s3(uri):
        try:
            with open(uri, "rb") as src:
                atomic_write_local(local_path, lambda fh: _copy(src, fh))
        except FileNotFoundError:
            raise ObjectNotFound(f"no such file: {uri}") from None
        return local_path
    bucket, key = split_s3(uri)
    client = s3_client()
    local_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=local_path.parent, prefix=f".{local_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with _s3_errors(uri):
            head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
            client.download_file(bucket, key, tmp, Config=_transfer_config(DEFAULT_MULTIPART_THRESHOLD))
            size = Path(tmp).stat().st_size
            want_hex = head.get("Metadata", {}).get("sha256")
            full_ok = head.get("ChecksumType") == "FULL_OBJECT" and head.get("ChecksumSHA256")
            if size != head["ContentLength"]:
                raise ChecksumMismatch(f"{uri}: got {size} bytes, expected {head['ContentLength']}")
            if want_hex or full_ok:
                sha_hex = _digests(Path(tmp), max(size, 1))[0]
                if (want_hex and sha_hex != want_hex) or (full_ok and _b64(bytes.fromhex(sha_hex)) != full_ok):
                    raise ChecksumMismatch(f"{uri}: downloaded bytes do not match the stored SHA-256")
            os.replace(tmp, local_path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return local_path


def sync_down(prefix: str, local_dir: str | Path) -> Path:
    """Mirror an S3 prefix into ``local_dir``; objects whose ETag and size are unchanged are not downloaded.

    The ETag/size of each downloaded object is kept in ``local_dir/.storage-sync.json``.  Files that this
    function downloaded earlier and that are gone from S3 are removed; other local files are left alone.
    A local ``prefix`` is returned as is (nothing to copy).
    """
    if not is_s3(prefix):
        if not Path(prefix).is_dir():
            raise ObjectNotFound(f"no such folder: {prefix}")
        return Path(prefix)
    local_dir = Path(local_dir)
    state_path = local_dir / SYNC_STATE_FILE
    state: dict[str, dict[str, Any]] = json.loads(state_path.read_text()) if state_path.exists() else {}
    remote = {info.path: info for info in list_file_info(prefix)}
    if not remote:
        raise ObjectNotFound(f"nothing under {prefix}")

    def fetch(info: FileInfo) -> None:
        target = local_dir / safe_relative(info.path)
        seen = state.get(info.path)
        if seen == {"etag": info.etag, "size": info.size} and target.is_file() and target.stat().st_size == info.size:
            return
        download_file(join(prefix, info.path), target)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(fetch, remote.values()))
    for rel in set(state) - set(remote):
        (local_dir / safe_relative(rel)).unlink(missing_ok=True)
    new_state = {rel: {"etag": i.etag, "size": i.size} for rel, i in sorted(remote.items())}
    write_bytes(str(state_path), json.dumps(new_state, indent=1).encode())
    return local_dir


def sync_up(local_dir: str | Path, prefix: str, *, multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD) -> list[str]:
    """Upload every file of ``local_dir`` below ``prefix``; files already there with the same content are skipped.

    "Same content" is judged from size and ETag (the MD5, or the multipart ETag for the same part size).
    Returns the relative paths that were uploaded.
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise ObjectNotFound(f"no such local folder: {local_dir}")
    remote = {info.path: info for info in list_file_info(prefix)} if is_s3(prefix) else {}
    files = [i for i in list_file_info(str(local_dir)) if i.path != SYNC_STATE_FILE]

    def push(info: FileInfo) -> str | None:
        src = local_dir / info.path
        there = remote.get(info.path)
        if there is not None and there.size == info.size:
            multipart = info.size >= multipart_threshold
            if multipart:
                etag = _digests(src, _part_size(info.size, multipart_threshold))[2]
            else:
                etag = hashlib.md5(src.read_bytes(), usedforsecurity=False).hexdigest()
            if etag == there.etag:
                return None
        target = Path(prefix, info.path)
        if not is_s3(prefix) and target.is_file() and target.read_bytes() == src.read_bytes():
            return None
        upload_file(src, join(prefix, info.path), multipart_threshold=multipart_threshold)
        return info.path

    with ThreadPoolExecutor(max_workers=8) as pool:
        return [p for p in pool.map(push, files) if p is not None]


def map_ordered(fn: Callable[[Any], Any], items: Iterable[Any], workers: int = 8) -> Iterator[Any]:
    """``map(fn, items)`` on a thread pool, results in input order, at most ``4 * workers`` in flight.

    Unlike ``ThreadPoolExecutor.map`` it consumes ``items`` lazily, so memory stays bounded on long inputs.
    """
    workers = max(1, workers)
    pending: deque[Any] = deque()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
