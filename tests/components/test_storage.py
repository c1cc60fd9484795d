"""components.storage on local paths (the S3 half is in test_storage_s3.py)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from components import storage


def test_uri_helpers():
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/x") and not storage.is_s3("s3:/b")
    assert storage.split_s3("s3://bucket/a/b.png") == ("bucket", "a/b.png")
    assert storage.split_s3("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError):
        storage.split_s3("s3:///key")
    assert storage.join("s3://b/root/", "images", "/x.png") == "s3://b/root/images/x.png"
    assert storage.join("s3://b", "a/b") == "s3://b/a/b"
    assert storage.join("/data/root", "images", "x.png") == "/data/root/images/x.png"


@pytest.mark.parametrize("rel", ["../x.png", "/etc/passwd", "a/../../x", "", ".", "..", "C:x.png", "\\..\\x"])
def test_safe_relative_refuses_escapes(rel):
    with pytest.raises(storage.UnsafePath):
        storage.safe_relative(rel)
    with pytest.raises(ValueError):  # UnsafePath is a ValueError too
        storage.child("/root", rel)


def test_safe_relative_normalises_inside_paths():
    assert storage.safe_relative("a/./b/../c.png") == "a/c.png"
    assert storage.safe_relative("a\\b.png") == "a/b.png"
    assert storage.child("s3://b/root", "x/y.png") == "s3://b/root/x/y.png"


def test_write_read_exists_delete_and_errors(tmp_path):
    uri = str(tmp_path / "deep" / "er" / "f.bin")
    assert not storage.exists(uri)
    storage.write_bytes(uri, b"abc")
    assert storage.exists(uri) and storage.read_bytes(uri) == b"abc"
    storage.write_bytes(uri, b"xyz!")
    assert storage.read_bytes(uri) == b"xyz!"
    assert not storage.exists(str(tmp_path / "deep"))  # a folder is not a file
    storage.delete(uri)
    storage.delete(uri)  # missing is fine
    assert not storage.exists(uri)
    with pytest.raises(storage.ObjectNotFound, match="no such file") as info:
        storage.read_bytes(uri)
    assert isinstance(info.value, FileNotFoundError)


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    uri = str(tmp_path / "manifest.parquet")
    storage.write_bytes(uri, b"good")
    with pytest.raises(TypeError):
        storage.write_bytes(uri, 12345)  # type: ignore[arg-type]  # fails while writing the temporary file
    assert storage.read_bytes(uri) == b"good"
    assert os.listdir(tmp_path) == ["manifest.parquet"]


def test_listing(tmp_path):
    for rel in ("b.txt", "a/x.txt", "a/deeper/y.txt"):
        storage.write_bytes(str(tmp_path / rel), rel.encode())
    assert sorted(storage.list_files(str(tmp_path))) == ["a/deeper/y.txt", "a/x.txt", "b.txt"]
    infos = {i.path: i for i in storage.list_file_info(str(tmp_path))}
    assert infos["a/x.txt"].size == len(b"a/x.txt") and infos["a/x.txt"].etag is None
    assert storage.list_dir(str(tmp_path)) == ["b.txt"]
    assert list(storage.list_files(str(tmp_path / "missing"))) == []
    assert storage.list_dir(str(tmp_path / "missing")) == []
    with pytest.raises(storage.StorageError, match="is a file"):
        list(storage.list_files(str(tmp_path / "b.txt")))


def test_has_symlink(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.png").write_bytes(b"x")
    (tmp_path / "link.png").symlink_to(tmp_path / "real" / "a.png")
    (tmp_path / "linkdir").symlink_to(tmp_path / "real")
    assert not storage.has_symlink(str(tmp_path), "real/a.png")
    assert storage.has_symlink(str(tmp_path), "link.png")
    assert storage.has_symlink(str(tmp_path), "linkdir/a.png")
    assert not storage.has_symlink("s3://b/root", "anything.png")


def test_local_upload_download_and_sync(tmp_path):
    src = tmp_path / "src"
    storage.write_bytes(str(src / "a.bin"), b"A" * 10)
    storage.write_bytes(str(src / "sub" / "b.bin"), b"B")
    storage.upload_file(src / "a.bin", str(tmp_path / "copy" / "a.bin"))
    assert (tmp_path / "copy" / "a.bin").read_bytes() == b"A" * 10
    storage.download_file(str(src / "sub" / "b.bin"), tmp_path / "dl" / "b.bin")
    assert (tmp_path / "dl" / "b.bin").read_bytes() == b"B"
    with pytest.raises(storage.ObjectNotFound):
        storage.download_file(str(src / "nope"), tmp_path / "dl" / "nope")
    with pytest.raises(storage.ObjectNotFound):
        storage.upload_file(src / "nope", str(tmp_path / "x"))
    # sync_down of a local folder is the folder itself; sync_up copies only what differs
    assert storage.sync_down(str(src), tmp_path / "unused") == src
    assert not (tmp_path / "unused").exists()
    assert sorted(storage.sync_up(src, str(tmp_path / "mirror"))) == ["a.bin", "sub/b.bin"]
    assert storage.sync_up(src, str(tmp_path / "mirror")) == []
    storage.write_bytes(str(src / "a.bin"), b"C" * 10)
    assert storage.sync_up(src, str(tmp_path / "mirror")) == ["a.bin"]
    assert (tmp_path / "mirror" / "a.bin").read_bytes() == b"C" * 10


def test_map_ordered_keeps_order_and_bounds_what_is_in_flight():
    pulled, lock = [], threading.Lock()

    def items():
        for i in range(50):
            with lock:
                pulled.append(i)
            yield i

    def slow_square(i):
        time.sleep(0.001 * (i % 3))
        return i * i

    out = storage.map_ordered(slow_square, items(), workers=2)
    assert next(out) == 0
    assert len(pulled) <= 4 * 2 + 1  # lazily consumed, not all 50 at once
    assert [0, *out] == [i * i for i in range(50)]
