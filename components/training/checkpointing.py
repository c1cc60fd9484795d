"""Training checkpoints for exact resume: written atomically, verified on load, the last K kept.

Layout under the trainer's output folder::

    checkpoints/
      step-000120/            one checkpoint: a native model checkpoint directory plus the training state
        config.json             \\
        model.safetensors        |  model.checkpoint.save_checkpoint (tokenizer / feature spec when given)
        feature_spec.json       /
        training_state.pt       optimizer, scheduler, per-rank sampler position and RNG states, step, epoch,
                                lineage hashes: tensors and plain types only, read with weights_only=True
        manifest.json           written LAST: every other file with its size and sha256
      step-000123.tmp/        being written (or left by a crash): never read, removed on the next start
      step-000100.corrupt/    failed verification on resume: kept for inspection, never read again

A checkpoint is written into ``step-N.tmp/``, its manifest last, then the folder is renamed to ``step-N/``;
a folder without a manifest, or whose files do not match it, is not a checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.checkpoint import WEIGHTS_FILE, save_checkpoint
from model.heads import ViLBertForPretraining, ViLBertForTasks

log = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "vilbert-training-checkpoint/1"
_NAME = re.compile(r"^step-(\d{6,})$")


class CheckpointError(RuntimeError):
    """A training checkpoint cannot be written or used."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint folder fails verification against its manifest."""


class ResumeMismatch(CheckpointError):
    """The checkpoint was made for other data, another feature spec or an incompatible setup."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- RNG states in weights_only-loadable form --------------------------------------------------------
def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """This process's python, numpy, torch CPU (and CUDA device) generator states, as tensors and ints."""
    version, mt, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    assert isinstance(key, np.ndarray)  # the legacy form is a tuple with the MT19937 key array
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos)},
        "numpy_gauss": {"has": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Mapping[str, Any], device: torch.device | None = None) -> None:
    """Inverse of :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy, gauss = state["numpy"], state["numpy_gauss"]
    key = npy["key"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], key, npy["pos"], gauss["has"], gauss["cached"]))
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def preserved_rng(device: torch.device):
    """Run a block (evaluation, probing) without moving the training RNG streams."""
    state = capture_rng(device)
    try:
        yield
    finally:
        restore_rng(state, device)


# ---- model weights --------------------------------------------------------------------------------
def save_model_dir(
    model: nn.Module,
    folder: Path,
    tokenizer=None,
    feature_spec: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """A native checkpoint directory for ViLBERT models; ``model.safetensors`` alone for any other module."""
    if isinstance(model, (ViLBertForPretraining, ViLBertForTasks)):
        save_checkpoint(model, folder, tokenizer=tokenizer, feature_spec=feature_spec, metadata=metadata)
        return
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata=dict(metadata or {}))


def load_model_weights(model: nn.Module, folder: Path) -> None:
    """Load ``model.safetensors`` into ``model`` (strict: every key must match)."""
    state = load_file(str(folder / WEIGHTS_FILE))
    model.load_state_dict(state, strict=True)


# ---- writing -------------------------------------------------------------------------------------
def write_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    training_state: Mapping[str, Any],
    tokenizer=None,
    feature_spec: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``root/step-N/`` atomically (``step-N.tmp/`` + manifest last + rename); returns the folder.

    A folder already named ``step-N`` (normally impossible: the trainer resumes from the newest valid one)
    is moved aside as ``.stale``, never overwritten in place."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / (final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model_dir(model, tmp, tokenizer, feature_spec, metadata={"step": str(step)})
    torch.save(dict(training_state), tmp / STATE_FILE)
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        _fsync(path)
        files[path.relative_to(tmp).as_posix()] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = {"format": MANIFEST_FORMAT, "step": step, "created": datetime.now(UTC).isoformat(), "files": files}
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    _fsync(tmp / MANIFEST_FILE)
    if final.exists():
        _set_aside(final, "stale")
    os.replace(tmp, final)
    _fsync(root)
    return final


def _set_aside(folder: Path, label: str) -> Path:
    """Rename ``folder`` to ``folder.<label>`` (``.<label>-2`` ... when taken) so it is never read again."""
    target = folder.with_name(f"{folder.name}.{label}")
    n = 2
    while target.exists():
        target = folder.with_name(f"{folder.name}.{label}-{n}")
        n += 1
    os.replace(folder, target)
    return target


# ---- finding and verifying ------------------------------------------------------------------------
def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoint folders (``step-N``), oldest first.  Not yet verified."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return sorted(found)


def verify_checkpoint(folder: Path) -> dict[str, Any]:
    """Check every file against the manifest (present, same size, same sha256); returns the manifest.

    Raises :class:`CorruptCheckpoint` saying what is wrong."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise CorruptCheckpoint(f"{folder}: no {MANIFEST_FILE} (incomplete checkpoint)")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"unexpected format {manifest.get('format')!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpoint(f"{folder}: unreadable {MANIFEST_FILE}: {exc}") from None
    for name in (STATE_FILE, WEIGHTS_FILE):
        if name not in files:
            raise CorruptCheckpoint(f"{folder}: the manifest does not list {name}")
    for name, meta in files.items():
        file = folder / name
        if not file.is_file():
            raise CorruptCheckpoint(f"{folder}: {name} is missing")
        if file.stat().st_size != meta["bytes"]:
            raise CorruptCheckpoint(f"{folder}: {name} has {file.stat().st_size} bytes, manifest says {meta['bytes']}")
        if file_sha256(file) != meta["sha256"]:
            raise CorruptCheckpoint(f"{folder}: {name} does not match its sha256 in the manifest")
    return manifest


def find_latest_valid(root: Path, set_aside_corrupt: bool = True) -> Path | None:
    """The newest checkpoint that passes :func:`verify_checkpoint`; newer ones that fail are logged and
    (by default) renamed ``*.corrupt`` so that no later start trusts them."""
    for _, folder in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(folder)
            return folder
        except CorruptCheckpoint as exc:
            if set_aside_corrupt:
                moved = _set_aside(folder, "corrupt")
                log.warning("skipping corrupt checkpoint: %s (kept as %s)", exc, moved.name)
            else:
                log.warning("skipping corrupt checkpoint: %s", exc)
    return None


def load_training_state(folder: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``training_state.pt`` of a checkpoint, loaded with ``weights_only=True`` (no arbitrary unpickling)."""
    try:
        return torch.load(folder / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as exc:  # the unpickler's own messages omit the path
        raise CorruptCheckpoint(f"{folder / STATE_FILE}: cannot be read as a weights-only state: {exc}") from exc


def clean_incomplete(root: Path) -> list[str]:
    """Remove ``*.tmp`` and ``*.deleting`` folders left by a crash (they are never checkpoints)."""
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.is_dir() and path.name.startswith("step-") and path.suffix in (".tmp", ".deleting"):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
    return removed


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (renamed first, so a half-deleted folder never
    looks like a checkpoint); returns the deleted folders."""
    doomed = [folder for _, folder in list_checkpoints(root)[:-keep_last]] if keep_last > 0 else []
    for folder in doomed:
        trash = folder.with_name(folder.name + ".deleting")
        os.replace(folder, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def check_lineage(saved: Mapping[str, str | None], current: Mapping[str, str | None], force: bool, where: Path) -> None:
    """Refuse to resume when a lineage hash (data, feature spec) known on both sides differs, unless forced."""
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if old is None or new is None:
            if old != new:
                log.warning(
                    "resume from %s: %s is %s in the checkpoint and %s now (not compared)", where, key, old, new
                )
            continue
        if old != new:
            message = (
                f"checkpoint {where} was trained with {key}={old}, this run has {key}={new}; "
                "resuming would mix two datasets (pass force_resume=True / --force-resume to continue anyway)"
            )
            if not force:
                raise ResumeMismatch(message)
            log.warning("%s -- continuing because force_resume is set", message)
