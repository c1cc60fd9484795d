"""components.storage against a real moto S3 server on loopback (fixtures in tests/conftest.py)."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest

from components import storage


def test_client_takes_endpoint_and_retry_mode_from_the_standard_chain(s3_env, monkeypatch):
    client = storage.s3_client()
    assert client.meta.endpoint_url == s3_env
    assert client.meta.config.retries["mode"] == "standard"
    # the S3-specific variable wins over the global one (boto3's own precedence)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env)
    assert storage.s3_client().meta.endpoint_url == s3_env


def test_round_trip_list_exists_delete(s3_bucket):
    uri = storage.join(s3_bucket, "root", "a", "b.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"hello")
    storage.write_bytes(storage.join(s3_bucket, "root", "top.txt"), b"t")
    storage.write_bytes(storage.join(s3_bucket, "rootless.txt"), b"not under root/")
    assert storage.exists(uri) and storage.read_bytes(uri) == b"hello"
    assert sorted(storage.list_files(storage.join(s3_bucket, "root"))) == ["a/b.bin", "top.txt"]
    assert storage.list_dir(storage.join(s3_bucket, "root")) == ["top.txt"]
    info = {i.path: i for i in storage.list_file_info(storage.join(s3_bucket, "root/"))}
    assert info["a/b.bin"].size == 5 and info["a/b.bin"].etag == hashlib.md5(b"hello").hexdigest()
    storage.delete(uri)
    assert not storage.exists(uri)
    assert list(storage.list_files(storage.join(s3_bucket, "nothing-here"))) == []


def test_put_carries_a_sha256_checksum_that_s3_stored(s3_bucket):
    uri = storage.join(s3_bucket, "k.bin")
    data = os.urandom(1000)
    storage.write_bytes(uri, data)
    bucket, key = storage.split_s3(uri)
    head = storage.s3_client().head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()


def test_missing_objects_and_buckets_are_clear_errors(s3_bucket):
    missing = storage.join(s3_bucket, "nope.bin")
    with pytest.raises(storage.ObjectNotFound, match="no such S3 object"):
        storage.read_bytes(missing)
    with pytest.raises(storage.ObjectNotFound):
        storage.download_file(missing, "/tmp/never-written")
    no_bucket = "s3://bucket-that-does-not-exist-42/x.bin"
    for call in (storage.read_bytes, storage.exists, lambda u: list(storage.list_files(u))):
        with pytest.raises(storage.BucketNotFound, match="does not exist"):
            call(no_bucket)
    with pytest.raises(storage.BucketNotFound):
        storage.write_bytes(no_bucket, b"x")


def test_corrupted_object_is_detected_on_read_and_download(s3_bucket, tmp_path):
    bucket, key = storage.split_s3(storage.join(s3_bucket, "bad.bin"))
    # an object whose bytes no longer match the sha256 recorded when it was written
    storage.s3_client().put_object(Bucket=bucket, Key=key, Body=b"rotten", Metadata={"sha256": "0" * 64})
    with pytest.raises(storage.ChecksumMismatch):
        storage.read_bytes(f"s3://{bucket}/{key}")
    with pytest.raises(storage.ChecksumMismatch):
        storage.download_file(f"s3://{bucket}/{key}", tmp_path / "bad.bin")
    assert list(tmp_path.iterdir()) == []  # nothing half-downloaded left behind


def test_multipart_upload_and_download_round_trip(s3_bucket, tmp_path):
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 * 1024 * 1024 + 123))
    uri = storage.join(s3_bucket, "big", "big.bin")
    storage.upload_file(src, uri, multipart_threshold=5 * 1024 * 1024)
    bucket, key = storage.split_s3(uri)
    head = storage.s3_client().head_object(Bucket=bucket, Key=key)
    assert head["ETag"].strip('"').endswith("-3")  # really uploaded in 3 parts
    assert head["ContentLength"] == src.stat().st_size
    out = storage.download_file(uri, tmp_path / "back" / "big.bin")
    assert out.read_bytes() == src.read_bytes()
    small = tmp_path / "small.bin"
    small.write_bytes(b"tiny")
    storage.upload_file(small, storage.join(s3_bucket, "small.bin"), multipart_threshold=5 * 1024 * 1024)
    assert storage.read_bytes(storage.join(s3_bucket, "small.bin")) == b"tiny"


def test_sync_down_skips_unchanged_objects(s3_bucket, tmp_path):
    prefix = storage.join(s3_bucket, "data")
    for rel, data in (("a.txt", b"a"), ("sub/b.txt", b"bb"), ("sub/c.txt", b"ccc")):
        storage.write_bytes(storage.join(prefix, rel), data)
    local = storage.sync_down(prefix, tmp_path / "mirror")
    assert (local / "sub" / "b.txt").read_bytes() == b"bb"
    (local / "mine.txt").write_bytes(b"not from S3")
    inodes = {p: os.stat(local / p).st_ino for p in ("a.txt", "sub/b.txt", "sub/c.txt")}

    storage.sync_down(prefix, local)  # nothing changed: no file is replaced
    assert {p: os.stat(local / p).st_ino for p in inodes} == inodes

    storage.write_bytes(storage.join(prefix, "sub/b.txt"), b"BB")  # same size, new ETag
    storage.delete(storage.join(prefix, "sub/c.txt"))
    storage.sync_down(prefix, local)
    assert (local / "sub" / "b.txt").read_bytes() == b"BB"
    assert os.stat(local / "sub" / "b.txt").st_ino != inodes["sub/b.txt"]
    assert os.stat(local / "a.txt").st_ino == inodes["a.txt"]
    assert not (local / "sub" / "c.txt").exists()
    assert (local / "mine.txt").read_bytes() == b"not from S3"  # files we did not download are left alone
    with pytest.raises(storage.ObjectNotFound):
        storage.sync_down(storage.join(s3_bucket, "empty"), tmp_path / "e")


def test_sync_up_skips_identical_objects(s3_bucket, tmp_path):
    src = tmp_path / "src"
    storage.write_bytes(str(src / "a.bin"), b"A" * 100)
    storage.write_bytes(str(src / "d" / "b.bin"), b"B" * 7)
    prefix = storage.join(s3_bucket, "up")
    assert sorted(storage.sync_up(src, prefix)) == ["a.bin", "d/b.bin"]
    assert storage.sync_up(src, prefix) == []
    storage.write_bytes(str(src / "a.bin"), b"C" * 100)
    assert storage.sync_up(src, prefix) == ["a.bin"]
    assert storage.read_bytes(storage.join(prefix, "a.bin")) == b"C" * 100


def test_sync_up_multipart_objects_are_recognised_as_identical(s3_bucket, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(6 * 1024 * 1024))
    prefix = storage.join(s3_bucket, "mp")
    threshold = 5 * 1024 * 1024
    assert storage.sync_up(src, prefix, multipart_threshold=threshold) == ["big.bin"]
    assert storage.sync_up(src, prefix, multipart_threshold=threshold) == []
