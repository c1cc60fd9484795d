"""The extraction worker of the features step, and the ranks it runs on.

:func:`extract_share` runs in one process (spawned, or the caller's): it loads the prepared backend, reads
and decodes its share of the images on a thread pool, extracts them in batches and appends the regions
to its own store part.  What fails is quarantined with a reason code (``bad_path``, ``missing_file``,
``read_error``, ``decode_error``, ``extract_error``, or the store's validation code such as
``box_count``), never raised.  :class:`Ranks` is the torchrun side: ``RANK`` / ``WORLD_SIZE`` from the
environment, a gloo process group when there are several ranks (both through
:mod:`components.training.distributed`), and helpers that run something on rank 0
(or everywhere) and share the outcome, errors included, so no rank waits forever on a failed one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from components.features.backends.base import BoxLimits, PreparedBackend

QUARANTINE_COLUMNS = ("image_id", "path", "split", "code", "reason")


@dataclass
class Share:
    """One process's part of the work (picklable: sent to spawned processes)."""

    prepared: PreparedBackend
    spec: Any
    """The store's FeatureSpec."""
    limits: BoxLimits
    device: str
    dataset: str
    store: str
    """Local store root."""
    part: str
    """This process's store part name."""
    rows: list[dict[str, str]]
    """Manifest rows: image_id, path, split."""
    batch_size: int
    threads: int
    read_workers: int
    checkpoint_every: int
    shard_bytes: int
    progress: bool
    position: int
    """Progress bar line."""


@dataclass
class ShareResult:
    part: str
    extracted: int = 0
    skipped_existing: int = 0
    regions: int = 0
    seconds: float = 0.0
    quarantine: list[dict[str, str]] = field(default_factory=list)


def _load_rows(share: Share) -> Iterator[tuple[dict[str, str], np.ndarray | tuple[str, str]]]:
    """Each row with its decoded RGB image, or (code, reason) when it cannot be had; in order."""
    from components import storage
    from components.features.backends.base import decode_rgb

    def load(row: dict[str, str]) -> tuple[dict[str, str], np.ndarray | tuple[str, str]]:
        try:
            uri = storage.child(share.dataset, row["path"])
        except storage.UnsafePath as exc:
            return row, ("bad_path", str(exc))
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError as exc:
            return row, ("missing_file", str(exc))
        except Exception as exc:  # network, permissions: this image's problem, not the run's
            return row, ("read_error", f"{type(exc).__name__}: {exc}")
        try:
            return row, decode_rgb(data)
        except Exception as exc:  # Pillow raises many types for damaged files
            return row, ("decode_error", f"{type(exc).__name__}: {exc}")

    return storage.map_ordered(load, share.rows, share.read_workers)


def extract_share(share: Share) -> ShareResult:
    """Extract ``share.rows`` into the store part ``share.part``; see the module docstring."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(share.threads)
    try:
        return _extract(share)
    finally:
        torch.set_num_threads(threads)  # when run in the caller's process, leave its setting as it was


def _extract(share: Share) -> ShareResult:
    from tqdm import tqdm

    from components.features.backends import BACKENDS
    from components.features.store import FeatureStoreWriter

    start = time.perf_counter()
    result = ShareResult(share.part)
    if not share.rows:
        return result
    extractor = BACKENDS[share.prepared.backend].load(share.prepared, share.limits, share.device)

    def reject(row: dict[str, str], code: str, reason: str) -> None:
        result.quarantine.append({**{k: row[k] for k in ("image_id", "path", "split")}, "code": code, "reason": reason})

    bar = tqdm(
        total=len(share.rows), desc=f"features {share.part}", position=share.position, disable=not share.progress
    )
    with FeatureStoreWriter(share.store, share.spec, share.shard_bytes, resume=True, part=share.part) as writer:
        batch: list[tuple[dict[str, str], np.ndarray]] = []
        since_checkpoint = 0

        def flush_batch() -> None:
            nonlocal since_checkpoint
            for (row, image), regions in zip(batch, _extract_isolated(extractor, batch, reject), strict=True):
                if regions is not None:
                    _store(writer, row, image, regions, result, reject)
            since_checkpoint += len(batch)
            bar.update(len(batch))
            batch.clear()
            if since_checkpoint >= share.checkpoint_every:
                writer.flush()
                since_checkpoint = 0

        for row, loaded in _load_rows(share):
            if row["image_id"] in writer:  # sealed by another writer between planning and now
                result.skipped_existing += 1
                bar.update(1)
            elif isinstance(loaded, tuple):
                reject(row, *loaded)
                bar.update(1)
            else:
                batch.append((row, loaded))
                if len(batch) >= share.batch_size:
                    flush_batch()
        if batch:
            flush_batch()
    bar.close()
    result.seconds = time.perf_counter() - start
    return result


def _extract_isolated(extractor, batch, reject) -> list[Any]:
    """Regions per image of the batch; if the batch fails, image by image, quarantining the ones that fail."""
    images = [image for _, image in batch]
    try:
        return list(extractor.extract(images))
    except Exception:
        pass  # find the culprit(s) below; the others are extracted alone
    out: list[Any] = []
    for row, image in batch:
        try:
            out.append(extractor.extract([image])[0])
        except Exception as exc:
            reject(row, "extract_error", f"{type(exc).__name__}: {exc}")
            out.append(None)
    return out


def _store(writer, row, image: np.ndarray, regions, result: ShareResult, reject) -> None:
    from components.features.spec import InvalidRegionFeatures, RegionFeatures

    height, width = image.shape[:2]
    record = RegionFeatures(row["image_id"], regions.boxes, regions.features, regions.class_probs, width, height)
    try:
        writer.add(record)
    except InvalidRegionFeatures as exc:
        reject(row, exc.code, str(exc))
        return
    result.extracted += 1
    result.regions += len(regions.boxes)


class RankFailed(RuntimeError):
    """Another rank failed; the message carries its error."""


class Ranks:
    """This process's place under torchrun, from :mod:`components.training.distributed`, plus error sharing.

    A context manager: with several ranks it joins (or reuses) a gloo process group for coordination (the
    objects exchanged are small), and leaves one it created on exit.  Alone, every helper is a plain call.
    """

    def __init__(self) -> None:
        from components.training.distributed import dist_info_from_env

        self.info = dist_info_from_env()
        self.rank, self.world, self.local_rank = self.info.rank, self.info.world_size, self.info.local_rank
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        self._created = False

    def __enter__(self) -> Ranks:
        if self.world > 1:
            import torch
            import torch.distributed as dist

            from components.training.distributed import init_distributed

            self._created = not dist.is_initialized()
            init_distributed(torch.device("cpu"), self.info)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._created:
            from components.training.distributed import teardown

            teardown()

    def run_on_zero(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0, its value (or its error) shared with every rank."""
        from components.training.distributed import broadcast_object

        if self.world == 1:
            return fn()
        value, error = None, None
        if self.rank == 0:
            try:
                value = fn()
            except Exception as exc:
                error = exc
        value, message = broadcast_object((value, None if error is None else f"{type(error).__name__}: {error}"))
        if error is not None:
            raise error
        if message is not None:
            raise RankFailed(f"rank 0 failed: {message}")
        return value

    def run_everywhere(self, fn: Callable[[], Any]) -> list[Any]:
        """``fn()`` on every rank; the list of all ranks' values, or an error if any rank failed."""
        from components.training.distributed import gather_objects

        if self.world == 1:
            return [fn()]
        try:
            mine: tuple[Any, str | None] = (fn(), None)
        except Exception as exc:
            mine = (None, f"rank {self.rank}: {type(exc).__name__}: {exc}")
        gathered = gather_objects(mine)
        errors = [message for _, message in gathered if message]
        if errors:
            raise RankFailed("; ".join(errors))
        return [value for value, _ in gathered]
