"""The format readers on small fixtures in the real formats (tests/data/formats/), locally and on S3."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path, PurePosixPath

import pytest

from components import storage
from components.sources import SourceFormatError, is_utf8, open_source, split_from_name
from components.sources.base import SourceCaption, SourceImage, SourceProblem
from components.sources.coco import CocoSource
from components.sources.conceptual_captions import (
    ConceptualCaptionsSource,
    FetchUnavailable,
    HttpImageFetcher,
    image_id_for,
)
from components.sources.folder import FolderSource

FORMATS = Path(__file__).resolve().parents[1] / "data" / "formats"


def split_items(items):
    good = [i for i in items if not isinstance(i, SourceProblem)]
    return good, [i for i in items if isinstance(i, SourceProblem)]


def test_split_from_name():
    assert split_from_name("captions_train2014") == "train"
    assert split_from_name("captions_val2014") == "val"
    assert split_from_name("Validation_GCC-1.1.0-Validation") == "val"
    assert split_from_name("Train_GCC-training") == "train"
    assert split_from_name("image_info_test2015") == "test"
    assert split_from_name("everything") == ""


def test_coco_captions_layout():
    src = open_source(str(FORMATS / "coco"))
    assert isinstance(src, CocoSource)
    images, problems = split_items(list(src.images()))
    assert not problems
    assert {(i.image_id, i.split) for i in images} == {("9", "train"), ("25", "train"), ("30", "train"),
                                                      ("42", "val"), ("73", "val")}  # fmt: skip
    nine = next(i for i in images if i.image_id == "9")
    assert nine.data == (FORMATS / "coco" / "train2014" / "COCO_train2014_000000000009.jpg").read_bytes()
    captions, problems = split_items(list(src.captions()))
    assert not problems and len(captions) == 10
    assert SourceCaption("9000", "9", captions[0].caption, "train") == captions[0]
    files = src.native_files().files
    assert set(files) == {PurePosixPath("annotations/captions_train2014.json"),
                          PurePosixPath("annotations/captions_val2014.json")}  # fmt: skip
    assert (
        files[PurePosixPath("annotations/captions_val2014.json")]
        == (FORMATS / "coco" / "annotations" / "captions_val2014.json").read_bytes()
    )
    # pointing at one file reads only that split
    val_only = open_source(str(FORMATS / "coco" / "annotations" / "captions_val2014.json"))
    assert sorted(i.image_id for i in val_only.images()) == ["42", "73"]


def test_coco_bad_entries_become_problems(tmp_path):
    shutil.copytree(FORMATS / "coco", tmp_path / "coco")
    path = tmp_path / "coco" / "annotations" / "captions_val2014.json"
    doc = json.loads(path.read_text())
    doc["images"].append({"id": 99})  # no file_name
    doc["images"].append({"id": 100, "file_name": "COCO_val2014_000000000100.jpg"})  # not on disk
    doc["annotations"].append({"id": 5, "image_id": 42})  # no caption
    path.write_text(json.dumps(doc))
    src = CocoSource(str(tmp_path / "coco"), [str(path)])
    _, problems = split_items(list(src.images()))
    assert {(p.row_id, p.reason) for p in problems} == {("images[2]", "bad_row"), ("100", "missing_file")}
    _, problems = split_items(list(src.captions()))
    assert [(p.row_id, p.reason) for p in problems] == [("5", "bad_row")]
    path.write_text("{not json")
    with pytest.raises(SourceFormatError, match="not valid JSON"):
        list(CocoSource(str(tmp_path / "coco"), [str(path)]).images())


def test_conceptual_captions_tsv_with_sha1_named_images():
    src = open_source(str(FORMATS / "conceptual_captions"))
    assert isinstance(src, ConceptualCaptionsSource)
    images, problems = split_items(list(src.images()))
    apple = image_id_for("http://example.com/img/apple.jpg")
    assert apple in {i.image_id for i in images} and len(images) == 4  # the repeated URL is one image
    assert [(p.row_id, p.reason) for p in problems] == [
        (image_id_for("http://example.com/img/gone.jpg"), "missing_file")
    ]
    assert {i.split for i in images} == {"train", "val"}
    captions, problems = split_items(list(src.captions()))
    assert not problems and len(captions) == 6
    assert [c.caption_id for c in captions if c.image_id == apple] == ["Train_GCC-training-1", "Train_GCC-training-4"]
    assert set(src.native_files().files) == {PurePosixPath("annotations/Train_GCC-training.tsv"),
                                             PurePosixPath("annotations/Validation_GCC-1.1.0-Validation.tsv")}  # fmt: skip


def test_conceptual_captions_url_map_bad_rows_and_no_network(tmp_path):
    root = tmp_path / "cc"
    (root / "images" / "shard0").mkdir(parents=True)
    samples = sorted((FORMATS / "conceptual_captions" / "images").iterdir())[:2]
    urls = ["http://a.example/1.jpg", "http://a.example/2.png"]
    blobs, mapping = {}, []
    for n, (url, sample) in enumerate(zip(urls, samples, strict=True)):
        rel = f"shard0/{n:09d}{sample.suffix}"  # img2dataset-style names, found through url_map.tsv
        (root / "images" / rel).write_bytes(sample.read_bytes())
        blobs[image_id_for(url)] = sample.read_bytes()
        mapping.append(f"{url}\t{rel}\n")
    (root / "images" / "url_map.tsv").write_text("".join(mapping))
    (root / "data.tsv").write_bytes(
        b"first caption\thttp://a.example/1.jpg\n"
        b"no tab on this line\n"
        b"too\tmany\tfields\n"
        b"caf\xe9 in latin-1\thttp://a.example/2.png\n"
    )
    src = open_source(str(root))
    images, problems = split_items(list(src.images()))
    assert {i.image_id: i.data for i in images} == blobs and not problems
    captions, problems = split_items(list(src.captions()))
    assert [(p.row_id, p.reason) for p in problems] == [("data-2", "bad_row"), ("data-3", "bad_row")]
    assert [is_utf8(c.caption) for c in captions] == [True, False]  # ingest decides what to do with it
    offline = ConceptualCaptionsSource([str(root / "data.tsv")], str(root / "images"), fetcher=HttpImageFetcher())
    with pytest.raises(FetchUnavailable, match="not available offline"):
        list(offline.images())


def test_folder_with_captions_csv():
    src = open_source(str(FORMATS / "folder_csv"))
    assert isinstance(src, FolderSource)
    images = list(src.images())
    assert [(i.image_id, i.split) for i in images] == [("images_cat", "train"), ("images_dog", "val"),
                                                      ("images_bird", "test")]  # fmt: skip
    assert all(isinstance(i, SourceImage) for i in images)
    captions = list(src.captions())
    assert [c.caption_id for c in captions] == ["images_cat-c0", "images_cat-c1", "images_dog-c0", "images_bird-c0"]
    assert captions[1].caption == "A cat, curled up."
    assert PurePosixPath("annotations/captions.csv") in src.native_files().files


def test_folder_with_captions_jsonl():
    src = open_source(str(FORMATS / "folder_jsonl" / "captions.jsonl"))
    images = list(src.images())
    assert [(i.image_id, i.split, i.filename_hint) for i in images] == [("photos_one", "", "one.png"),
                                                                         ("photos_two", "", "two.jpg")]  # fmt: skip
    captions = list(src.captions())
    assert [(c.caption_id, c.caption) for c in captions] == [("photos_one-c0", "Un carré rouge."),
                                                             ("two-main", "A purple square.")]  # fmt: skip


def test_folder_bad_rows_and_header(tmp_path):
    (tmp_path / "captions.jsonl").write_text(
        '{"image": "a.png", "caption": "x"}\nnot json\n[1, 2]\n{"caption": "no image"}\n'
    )
    src = FolderSource(str(tmp_path), "captions.jsonl")
    _, problems = split_items(list(src.captions()))
    assert [(p.row_id, p.reason) for p in problems] == [
        ("row 2", "bad_row"),
        ("row 3", "bad_row"),
        ("row 4", "bad_row"),
    ]
    assert [(p.row_id, p.reason) for p in src.images()] == [("a", "missing_file")]
    (tmp_path / "captions.csv").write_text("file,text\na.png,x\n")
    with pytest.raises(SourceFormatError, match="must name an image column"):
        list(FolderSource(str(tmp_path), "captions.csv").captions())
    (tmp_path / "captions.csv").write_text("image,caption\na.png,x,extra\nb.png\n")
    _, problems = split_items(list(FolderSource(str(tmp_path), "captions.csv").captions()))
    assert [p.reason for p in problems] == ["bad_row", "bad_row"]


def test_layout_detection_errors(tmp_path):
    with pytest.raises(storage.ObjectNotFound):
        open_source(str(tmp_path / "missing"))
    (tmp_path / "only-images").mkdir()
    (tmp_path / "only-images" / "a.png").write_bytes(b"x")
    with pytest.raises(SourceFormatError, match="no known source layout"):
        open_source(str(tmp_path / "only-images"))
    (tmp_path / "both").mkdir()
    (tmp_path / "both" / "captions.csv").write_text("image,caption\n")
    (tmp_path / "both" / "x.tsv").write_text("")
    with pytest.raises(SourceFormatError, match="several source layouts"):
        open_source(str(tmp_path / "both"))
    with pytest.raises(SourceFormatError, match="unsupported source URI scheme"):
        open_source("http://example.com/data")
    with pytest.raises(SourceFormatError, match="cannot tell the format"):
        open_source(str(tmp_path / "only-images" / "a.png"))


@pytest.mark.parametrize("fixture", ["coco", "conceptual_captions", "folder_csv", "folder_jsonl"])
def test_readers_on_s3_match_the_local_read(s3_bucket, fixture):
    prefix = storage.join(s3_bucket, "sources", fixture)
    storage.sync_up(FORMATS / fixture, prefix)
    local, remote = open_source(str(FORMATS / fixture)), open_source(prefix)
    assert type(local) is type(remote)

    def digest(src):
        rows = [(i.image_id, i.split, hashlib.sha256(i.data).hexdigest()) if isinstance(i, SourceImage)
                else (i.row_id, i.reason) for i in src.images()]  # fmt: skip
        return rows, [c for c in src.captions()], src.native_files().files

    assert digest(local) == digest(remote)
