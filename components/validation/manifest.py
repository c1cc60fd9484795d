"""The manifest suite: ids, files on disk (exist, sha256, decode with Pillow), sizes, formats, splits.

Our code opens every image (the derived ``chk_*`` columns); GX then expects those columns to hold what the
manifest promises.
"""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from components.validation.engine import (
    TableCheck,
    between,
    id_rules,
    in_set,
    must_be_true,
    not_null,
    same_as,
    schema_rules,
)
from components.validation.limits import ValidationLimits
from components.validation.refs import add_one_split_column, leakage_rule, split_rules

MANIFEST_COLUMNS = {
    "image_id": "str",
    "path": "str",
    "sha256": "str",
    "width": "int32",
    "height": "int32",
    "format": "str",
    "mode": "str",
    "split": "str",
    "source": "str",
}
SPLITS = ("train", "val", "test")
_FILE_COLUMNS = (
    "chk_path_safe",
    "chk_file_exists",
    "chk_sha256_ok",
    "chk_decodes",
    "chk_decoded_width",
    "chk_decoded_height",
    "chk_decoded_format",
    "chk_decoded_mode",
)


def read_parquet(path: Path) -> tuple[pa.Table | None, pd.DataFrame, list[str]]:
    """Arrow table, pandas frame (nullable integers, so a null width stays an integer column), problems."""
    if not path.is_file():
        return None, pd.DataFrame(), [f"{path.name} not found"]
    try:
        table = pq.read_table(path)
    except Exception as exc:  # a corrupt file is a dataset-level failure, not a crash
        return None, pd.DataFrame(), [f"{path.name} unreadable: {exc}"]
    mapper = {
        pa.int8(): pd.Int8Dtype(),
        pa.int16(): pd.Int16Dtype(),
        pa.int32(): pd.Int32Dtype(),
        pa.int64(): pd.Int64Dtype(),
    }
    return table, table.to_pandas(types_mapper=mapper.get).reset_index(drop=True), []


def arrow_record(table: pa.Table | None, frame: pd.DataFrame):
    """Row position -> that row's original fields (from Arrow when we have it, so types survive)."""
    if table is not None:
        return lambda i: table.slice(i, 1).to_pylist()[0]
    return lambda i: frame.iloc[i].to_dict()


def _safe_relative(path: Any) -> bool:
    if not isinstance(path, str) or not path:
        return False
    p = PurePosixPath(path)
    return not p.is_absolute() and ".." not in p.parts and "\\" not in path


def inspect_file(root: Path, path: Any, sha256: Any) -> dict[str, Any]:
    """Open one image file: does it exist, does its digest match, does Pillow decode it, what size is it."""
    from PIL import Image

    out: dict[str, Any] = dict.fromkeys(_FILE_COLUMNS)
    out["chk_path_safe"] = _safe_relative(path) if isinstance(path, str) else None
    if not out["chk_path_safe"]:
        return out
    file = root / path
    if not file.resolve().is_relative_to(root.resolve()):  # a symbolic link out of the dataset root
        out["chk_path_safe"] = False
        return out
    out["chk_file_exists"] = file.is_file()
    if not out["chk_file_exists"]:
        return out
    data = file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    out["chk_sha256"] = digest
    out["chk_sha256_ok"] = digest == sha256.lower() if isinstance(sha256, str) else None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # a full decode: truncated or corrupt pixel data fails here, not only a bad header
            out.update(
                chk_decoded_width=im.width,
                chk_decoded_height=im.height,
                chk_decoded_format=im.format,
                chk_decoded_mode=im.mode,
            )
        out["chk_decodes"] = True
    except Exception:  # Pillow raises many types for bad data; all mean "does not decode"
        out["chk_decodes"] = False
    return out


def manifest_check(root: Path, limits: ValidationLimits, workers: int = 4) -> tuple[TableCheck, pa.Table | None]:
    """The manifest table with its derived columns and rules (and the Arrow table, for the accepted output)."""
    table, frame, problems = read_parquet(root / "manifest.parquet")
    paths = frame["path"] if "path" in frame else pd.Series([None] * len(frame))
    shas = frame["sha256"] if "sha256" in frame else pd.Series([None] * len(frame))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # hashing and decoding release the GIL
        inspected = list(pool.map(lambda ps: inspect_file(root, *ps), zip(paths, shas, strict=True)))
    derived = pd.DataFrame(inspected, columns=[*_FILE_COLUMNS, "chk_sha256"], index=frame.index, dtype=object)
    frame = pd.concat([frame, derived], axis=1)
    leak_by_id, leak_by_content = "chk_one_split", "chk_content_one_split"
    if {"image_id", "split"} <= set(frame.columns):
        add_one_split_column(frame, "image_id", "split", leak_by_id)
        add_one_split_column(frame, "chk_sha256", "split", leak_by_content)
    else:
        frame[leak_by_id] = frame[leak_by_content] = pd.Series([None] * len(frame), dtype=object)
    derived_cols = [c for c in frame.columns if c.startswith("chk_")]

    side = f"outside [{limits.min_image_side}, {limits.max_image_side}]"
    decoded = "the decoded image's {} differs from the manifest's"
    rules = schema_rules(MANIFEST_COLUMNS, derived_cols) + [
        *id_rules("image_id"),
        not_null("path"),
        must_be_true("chk_path_safe", "unsafe_path", "path is absolute or leaves the dataset root"),
        must_be_true("chk_file_exists", "missing_file", "the image file does not exist"),
        not_null("sha256"),
        must_be_true("chk_sha256_ok", "sha256_mismatch", "the file's sha256 differs from the manifest's"),
        must_be_true("chk_decodes", "undecodable_image", "Pillow cannot decode the image"),
        not_null("width", "missing_size", "width or height is empty"),
        not_null("height", "missing_size", "width or height is empty"),
        between("width", "width_out_of_range", f"width {side}", limits.min_image_side, limits.max_image_side),
        between("height", "height_out_of_range", f"height {side}", limits.min_image_side, limits.max_image_side),
        same_as("width", "chk_decoded_width", "size_mismatch", decoded.format("size")),
        same_as("height", "chk_decoded_height", "size_mismatch", decoded.format("size")),
        in_set(
            "format",
            "unsupported_format",
            f"format is not one of {', '.join(limits.image_formats)}",
            limits.image_formats,
        ),
        same_as("format", "chk_decoded_format", "format_mismatch", decoded.format("format")),
        same_as("mode", "chk_decoded_mode", "mode_mismatch", decoded.format("PIL mode")),
        *split_rules(SPLITS),
        leakage_rule(leak_by_id, "image_id"),
        must_be_true(
            leak_by_content,
            "content_split_leakage",
            "identical image bytes are stored under different splits",
            fatal=True,
        ),
    ]
    check = TableCheck(
        name="manifest",
        source="manifest.parquet",
        frame=frame,
        row_id_column="image_id",
        rules=rules if table is not None else [],
        record=arrow_record(table, frame),
        problems=problems,
    )
    return check, table
