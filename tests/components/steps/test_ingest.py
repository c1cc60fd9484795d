"""The ingest step: bad input first, then the contract, idempotency and atomicity (local output)."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.sources import synthetic
from components.sources.base import SourceCaption, SourceFiles, SourceImage, SourceProblem
from components.steps.ingest import (
    CAPTIONS_SCHEMA,
    MANIFEST_SCHEMA,
    IngestConfig,
    hash_split,
    run_ingest,
)

ROOT = Path(__file__).resolve().parents[3]
FORMATS = ROOT / "tests" / "data" / "formats"


def encode(mode: str, fmt: str, size=(16, 12), noise: bool = False) -> bytes:
    image = Image.effect_noise(size, 60).convert(mode) if noise else Image.new(mode, size)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header (with a valid CRC) claims another size: a decompression-bomb header."""
    data = bytearray(encode("L", "PNG", (1, 1)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def config(source, output, **kw) -> IngestConfig:
    return IngestConfig(source=str(source), output=str(output), **({"progress": False, "workers": 2} | kw))


def read_table(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


@pytest.fixture
def bad_folder(tmp_path) -> Path:
    """A folder source with one row per kind of bad input, plus good images in every accepted mode."""
    root = tmp_path / "src"
    (root / "img").mkdir(parents=True)
    jpeg = encode("RGB", "JPEG", (64, 64), noise=True)
    png = encode("RGB", "PNG", (64, 64), noise=True)
    flipped = bytearray(png)
    flipped[len(png) // 2] ^= 0xFF
    files = {
        "rgb.jpg": encode("RGB", "JPEG"),
        "cmyk.jpg": encode("CMYK", "JPEG"),
        "grey.png": encode("L", "PNG"),
        "alpha.png": encode("RGBA", "PNG"),
        "palette.png": encode("P", "PNG"),
        "greyalpha.webp": encode("LA", "WEBP"),
        "png-named.jpg": encode("RGB", "PNG"),
        "zero.jpg": b"",
        "text.jpg": b"this is not an image\n",
        "trunc.jpg": jpeg[: len(jpeg) * 6 // 10],
        "trunc-png.png": png[: len(png) * 6 // 10],
        "same.png": encode("RGB", "PNG"),
        "same.jpg": encode("RGB", "JPEG"),  # the same image id as same.png
        "corrupt.png": bytes(flipped),
        "scan.tif": encode("RGB", "TIFF"),
        "anim.gif": encode("RGB", "GIF"),
        "bomb.png": png_claiming(100_000, 100_000),
        "big.png": encode("L", "PNG", (400, 300)),
    }
    for name, data in files.items():
        (root / "img" / name).write_bytes(data)
    (tmp_path / "outside.png").write_bytes(encode("RGB", "PNG"))
    (root / "img" / "link.png").symlink_to(root / "img" / "rgb.jpg")
    (root / "linked").symlink_to(root / "img")
    lines = ["image,caption,split,caption_id"]
    lines += [f"img/{name},caption of {name},," for name in files]
    lines += [
        "img/rgb.jpg,   ,,blank",
        "img/rgb.jpg,,,empty",
        "img/rgb.jpg," + "x" * 200 + ",,long",
        "img/rgb.jpg,a second caption,,dup",
        "img/grey.png,same id again,,dup",
        "img/missing.png,a missing file,,",
        "../outside.png,escapes the root,,",
        "img/link.png,a symlinked file,,",
        "linked/grey.png,through a symlinked folder,,",
    ]
    data = "\n".join(lines).encode() + b"\nimg/grey.png,caf\xe9 au lait,,latin1\n"
    (root / "captions.csv").write_bytes(data)
    return root


EXPECTED_IMAGE_REASONS = {
    "img_zero": "empty_file",
    "img_text": "unsupported_format",
    "img_scan": "unsupported_format",
    "img_anim": "unsupported_format",
    "img_trunc": "truncated_image",
    "img_trunc-png": "truncated_image",
    "img_corrupt": "corrupt_image",
    "img_bomb": "too_many_pixels",
    "img_big": "too_many_pixels",
    "img_missing": "missing_file",
    "outside": "path_escapes_root",
    "img_link": "symlink",
    "linked_grey": "symlink",
}


def test_every_kind_of_bad_input_is_quarantined_with_its_reason(bad_folder, tmp_path):
    out = tmp_path / "out"
    result = run_ingest(config(bad_folder, out, max_image_pixels=100_000, max_caption_chars=100))
    quarantine = read_table(out / "quarantine.parquet")
    images_q = {(r["row_id"], r["reason"]) for r in quarantine if r["table"] == "images"}
    assert images_q == set(EXPECTED_IMAGE_REASONS.items()) | {("img_same", "duplicate_image_id")}
    big = next(r for r in quarantine if r["row_id"] == "img_big")
    assert (big["width"], big["height"], big["format"]) == (400, 300, "PNG")

    manifest = {r["image_id"]: r for r in read_table(out / "manifest.parquet")}
    assert {k: v["mode"] for k, v in manifest.items()} == {
        "img_rgb": "RGB", "img_cmyk": "CMYK", "img_grey": "L", "img_alpha": "RGBA", "img_palette": "P",
        "img_greyalpha": "RGBA", "img_png-named": "RGB", "img_same": "RGB",
    }  # fmt: skip
    assert manifest["img_png-named"]["path"] == "images/img_png-named.png"  # extension from the decoded format
    assert manifest["img_greyalpha"]["format"] == "WEBP"
    for row in manifest.values():  # stored bytes are the source bytes, unchanged
        assert hashlib.sha256((out / row["path"]).read_bytes()).hexdigest() == row["sha256"]
    assert (out / "images" / "img_rgb.jpg").read_bytes() == (bad_folder / "img" / "rgb.jpg").read_bytes()
    assert sorted(os.listdir(out / "images")) == sorted(Path(r["path"]).name for r in manifest.values())

    captions_q = {r["row_id"]: r["reason"] for r in quarantine if r["table"] == "captions"}
    for cid, reason in {"blank": "empty_caption", "empty": "empty_caption", "long": "caption_too_long",
                        "dup": "duplicate_caption_id", "latin1": "caption_not_utf8"}.items():  # fmt: skip
        assert captions_q[cid] == reason
    assert captions_q["img_zero-c0"] == "image_not_ingested"
    assert captions_q["img_same-c1"] == "duplicate_image_id"  # the caption of same.jpg, not given to same.png
    latin1 = next(r for r in quarantine if r["row_id"] == "latin1")
    assert latin1["caption"] == "caf\\xe9 au lait"  # kept, with the bad byte visible
    assert {r["caption_id"] for r in read_table(out / "captions.parquet")} == {f"{i}-c0" for i in manifest} | {"dup"}

    # counts reconcile, per table and in the report
    for counts in (result.images, result.captions, result.files):
        assert counts.reconciles()
    assert result.images.seen == len(manifest) + len(images_q)
    assert result.captions.seen == len(read_table(out / "captions.parquet")) + len(captions_q)
    report = json.loads((out / "ingest_report.json").read_text())
    assert (report["seen"], report["stored"], report["quarantined"]) == (result.images.seen, 8, len(images_q))
    assert report["reasons"]["too_many_pixels"] == 2 and report["captions"]["reasons"]["empty_caption"] == 2
    assert report["reconciled"] is True
    assert not list(out.rglob("*.tmp"))


def test_written_files_match_the_data_contract(tmp_path):
    out = tmp_path / "out"
    run_ingest(config(FORMATS / "folder_csv", out))
    contract = (ROOT / "components" / "DATA_CONTRACTS.md").read_text()

    def contract_columns(title: str) -> list[str]:
        """Column names of the first Markdown table after the heading ``### <title>``."""
        lines = contract.split(f"### {title}", 1)[1].splitlines()
        start = next(n for n, line in enumerate(lines) if line.startswith("|"))
        rows = [line for line in itertools.takewhile(lambda x: x.startswith("|"), lines[start:])][2:]
        return [name for row in rows for name in re.split(r",\s*", row.split("|")[1].strip())]

    assert contract_columns("manifest.parquet") == MANIFEST_SCHEMA.names
    assert contract_columns("captions.parquet") == CAPTIONS_SCHEMA.names
    assert pq.read_schema(out / "manifest.parquet").equals(MANIFEST_SCHEMA, check_metadata=False)
    assert pq.read_schema(out / "captions.parquet").equals(CAPTIONS_SCHEMA, check_metadata=False)
    quarantine_cols = set(contract_columns("quarantine.parquet"))
    assert set(pq.read_schema(out / "quarantine.parquet").names) == quarantine_cols
    manifest = read_table(out / "manifest.parquet")
    for row in manifest:
        assert not row["path"].startswith("/") and ".." not in row["path"] and row["split"] in ("train", "val", "test")
        assert row["source"] == str(FORMATS / "folder_csv")
    assert [(r["image_id"], r["split"]) for r in manifest] == [("images_bird", "test"), ("images_cat", "train"),
                                                               ("images_dog", "val")]  # fmt: skip
    assert (out / "annotations" / "captions.csv").read_bytes() == (FORMATS / "folder_csv" / "captions.csv").read_bytes()


@pytest.mark.parametrize("fixture", ["coco", "conceptual_captions", "folder_jsonl"])
def test_each_real_format_ingests(tmp_path, fixture):
    out = tmp_path / "out"
    result = run_ingest(config(FORMATS / fixture, out))
    assert result.images.stored == len(read_table(out / "manifest.parquet")) > 0
    assert result.images.reconciles() and result.captions.reconciles()
    if fixture == "conceptual_captions":  # the URL whose image was never downloaded
        assert result.images.reasons == {"missing_file": 1} and result.captions.reasons == {"image_not_ingested": 1}
    else:
        assert result.images.quarantined == 0 and result.captions.quarantined == 0


def test_rerun_skips_unchanged_images_and_cleans_up(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    for n in range(4):
        (src / "images" / f"{n}.png").write_bytes(encode("RGB", "PNG", (8 + n, 8)))
    (src / "captions.csv").write_text("image,caption\n" + "".join(f"images/{n}.png,picture {n}\n" for n in range(4)))
    out = tmp_path / "out"
    first = run_ingest(config(src, out))
    assert (first.images.stored, first.images.skipped_unchanged) == (4, 0)
    manifest_before = (out / "manifest.parquet").read_bytes()
    stats = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "images").iterdir()}

    second = run_ingest(config(src, out))
    assert (second.images.stored, second.images.skipped_unchanged, second.removed_stale) == (0, 4, 0)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "images").iterdir()} == stats
    assert (out / "manifest.parquet").read_bytes() == manifest_before

    (src / "images" / "1.png").write_bytes(encode("RGB", "PNG", (30, 30)))  # changed
    (src / "images" / "2.png").write_bytes(b"now broken")  # will be quarantined
    (src / "captions.csv").write_text("image,caption\n" + "".join(f"images/{n}.png,picture {n}\n" for n in range(3)))
    third = run_ingest(config(src, out))
    assert (third.images.stored, third.images.skipped_unchanged, third.images.quarantined) == (1, 1, 1)
    assert third.removed_stale == 2  # images/images_2.png (now broken) and images/images_3.png (dropped)
    assert sorted(os.listdir(out / "images")) == ["images_0.png", "images_1.png"]
    manifest = {r["image_id"]: r for r in read_table(out / "manifest.parquet")}
    assert manifest["images_1"]["width"] == 30


def test_a_failing_run_leaves_the_previous_dataset_intact(tmp_path):
    out = tmp_path / "out"
    run_ingest(config(FORMATS / "folder_csv", out))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    class Exploding:
        uri = "test://exploding"

        def images(self):
            yield SourceImage("fresh", encode("RGB", "PNG"), "train", "mem")
            raise OSError("the network went away")

        def captions(self):
            return iter(())

        def native_files(self):
            return SourceFiles()

    with pytest.raises(OSError, match="network went away"):
        run_ingest(config("test://exploding", out), source=Exploding())
    for path, data in before.items():
        assert path.read_bytes() == data, path
    assert not list(out.rglob("*.tmp"))


@dataclass
class ListSource:
    """A source made of lists, for cases no file format can express."""

    items: list
    caps: list = field(default_factory=list)
    files: dict = field(default_factory=dict)
    uri: str = "test://list"

    def images(self):
        return iter(self.items)

    def captions(self):
        return iter(self.caps)

    def native_files(self):
        return SourceFiles(self.files)


def test_ids_splits_and_native_paths_from_a_source_object(tmp_path):
    png = encode("RGB", "PNG")
    src = ListSource(
        items=[
            SourceImage("ok", png, "train", "mem"),
            SourceImage("ok", encode("L", "PNG"), "train", "mem"),  # same id again
            SourceImage("../evil", png, "train", "mem"),  # would escape images/
            SourceImage("weird split", png, "train", "mem"),
            SourceImage("odd", png, "holdout", "mem"),
            SourceImage("nosplit", png, "", "mem"),
            SourceProblem("gone", "missing_file", "mem://gone"),
        ],
        caps=[
            SourceCaption("c1", "ok", "  fine  ", "val"),
            SourceCaption("c2", "nobody", "orphan", "train"),
            SourceCaption("c3", "odd", "its image had a bad split", "train"),
            SourceCaption("c4", "ok", "bad \udce9 bytes", "train"),
            SourceProblem("c5", "bad_row", "mem:5"),
        ],
        files={
            PurePosixPath("annotations/instances.json"): b"{}",
            PurePosixPath("tasks/vqa/q.json"): b"[]",
            PurePosixPath("../escape.json"): b"x",
            PurePosixPath("elsewhere/x.json"): b"x",
        },
    )
    out = tmp_path / "out"
    result = run_ingest(config("test://list", out), source=src)
    reasons = {(r["table"], r["row_id"], r["reason"]) for r in read_table(out / "quarantine.parquet")}
    assert reasons == {
        ("images", "ok", "duplicate_image_id"), ("images", "../evil", "bad_image_id"),
        ("images", "weird split", "bad_image_id"), ("images", "odd", "bad_split"), ("images", "gone", "missing_file"),
        ("captions", "c2", "unknown_image"), ("captions", "c3", "image_not_ingested"),
        ("captions", "c4", "caption_not_utf8"), ("captions", "c5", "bad_row"),
        ("files", "../escape.json", "path_escapes_root"), ("files", "elsewhere/x.json", "bad_native_path"),
    }  # fmt: skip
    assert not (tmp_path / "evil.png").exists() and not (tmp_path / "escape.json").exists()
    manifest = {r["image_id"]: r for r in read_table(out / "manifest.parquet")}
    assert manifest["ok"]["split"] == "train" and manifest["ok"]["mode"] == "RGB"  # the first "ok" wins
    assert manifest["nosplit"]["split"] == hash_split("nosplit", (0.8, 0.1, 0.1))
    assert read_table(out / "captions.parquet") == [
        {"caption_id": "c1", "image_id": "ok", "caption": "fine", "split": "train", "source": "test://list"}
    ]
    assert (out / "tasks" / "vqa" / "q.json").read_bytes() == b"[]"
    assert (result.files.seen, result.files.stored, result.files.quarantined) == (4, 2, 2)


def test_hash_split_is_deterministic_and_follows_the_shares():
    ids = [f"img-{n}" for n in range(3000)]
    splits = [hash_split(i, (0.8, 0.1, 0.1)) for i in ids]
    assert splits == [hash_split(i, (0.8, 0.1, 0.1)) for i in ids]
    share = splits.count("train") / len(ids)
    assert 0.77 < share < 0.83 and 0.08 < splits.count("val") / len(ids) < 0.12
    assert {hash_split(i, (1.0, 0.0, 0.0)) for i in ids[:200]} == {"train"}
    assert splits != [hash_split(i, (0.8, 0.1, 0.1), salt="other") for i in ids]


def test_split_policy_hash_overrides_the_source(tmp_path):
    out = tmp_path / "out"
    run_ingest(config(FORMATS / "folder_csv", out, split_policy="hash", split_fractions=(0.0, 0.0, 1.0)))
    assert {r["split"] for r in read_table(out / "manifest.parquet")} == {"test"}
    assert {r["split"] for r in read_table(out / "captions.parquet")} == {"test"}


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"split_fractions": (0.5, 0.5, 0.5)}, "sum to 1"),
        ({"split_policy": "random"}, "split_policy"),
        ({"allowed_formats": ("JPEG", "NOPE")}, "unknown PIL formats"),
        ({"max_image_pixels": 0}, "max_image_pixels"),
        ({"max_image_pixels": 10**12}, "Pillow's limit"),
        ({"workers": 0}, "workers"),
    ],
)
def test_config_is_validated(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        config(FORMATS / "folder_csv", tmp_path, **kw)
    with pytest.raises(ValueError, match="output must differ"):
        config(FORMATS / "folder_csv", FORMATS / "folder_csv")


def test_synthetic_source_ingests(tmp_path):
    uri = "synthetic://shapes?seed=0&n=20"
    expected = sorted(i.image_id for i in synthetic.SyntheticSource(uri).images())
    out = tmp_path / "out"
    result = run_ingest(config(uri, out))
    assert result.images.reconciles() and result.captions.reconciles() and result.files.reconciles()
    assert result.images.quarantined == result.captions.quarantined == result.files.quarantined == 0
    manifest = read_table(out / "manifest.parquet")
    assert [r["image_id"] for r in manifest] == expected and len(expected) >= 20
    assert {r["source"] for r in manifest} == {uri} and {r["split"] for r in manifest} == {"train", "val", "test"}
    assert result.captions.stored > 0 and (out / "annotations" / "instances.json").exists()


def test_cli_ingest(tmp_path, bad_folder):
    from typer.testing import CliRunner

    from components.cli import app

    runner = CliRunner()
    done = runner.invoke(app, ["ingest", "--source", str(FORMATS / "folder_csv"), "--output", str(tmp_path / "a"),
                               "--no-progress"])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "images" in done.output and (tmp_path / "a" / "manifest.parquet").exists()
    done = runner.invoke(app, ["ingest", "--source", str(bad_folder), "--output", str(tmp_path / "b"),
                               "--no-progress", "--fail-on-quarantine"])  # fmt: skip
    assert done.exit_code == 2 and "too_many_pixels" in done.output
    done = runner.invoke(app, ["ingest", "--source", str(tmp_path / "nothing"), "--output", str(tmp_path / "c")])
    assert done.exit_code == 1 and "ingest failed" in done.output
