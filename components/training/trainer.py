"""One training loop for pretraining and fine-tuning: DDP from the torchrun environment, bf16 autocast on
GPU, gradient accumulation and clipping, atomic checkpoints every N steps and an exact resume.

The trainer knows nothing about ViLBERT's batches: the caller passes a dataset, a ``collate_fn``, a
resumable sampler and ``loss_fn(model, batch) -> (loss, metrics)``.  See :class:`ResumableSampler` for
what the sampler must promise so that a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import checkpointing as ckpt
from . import distributed as du
from .config import TrainerConfig, TrainResult
from .optim import build_adamw, freeze_parameters, resolve_warmup, warmup_linear_decay

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], tuple[Tensor, Mapping[str, float]]]
EvalFn = Callable[[nn.Module, int], Mapping[str, float]]


@runtime_checkable
class ResumableSampler(Protocol):
    """What the trainer needs from a sampler: ``components.data.sampler.ResumableDistributedSampler``'s API.

    * ``set_epoch(e)`` positions the sampler at the start of epoch ``e``; the order depends only on
      (seed, epoch, rank), never on the global RNGs.
    * ``__iter__`` yields this rank's items (dataset indices) from the current position to the epoch's end;
      every rank yields as many.
    * ``samples_per_epoch()``: items per rank in a whole epoch.
    * ``state_dict(index=n)``: the position after this rank consumed ``n`` items of the current epoch, in
      plain types.  The trainer counts what it really consumed, so DataLoader prefetching does not matter.
    * ``load_state_dict(state)`` continues where such a state stopped (epoch included).
    """

    def __iter__(self) -> Iterator[Any]: ...
    def set_epoch(self, epoch: int) -> None: ...
    def samples_per_epoch(self) -> int: ...
    def state_dict(self, index: int | None = None) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class _Progress:
    """Where the run is: saved in every checkpoint."""

    step: int = 0
    epoch: int = 0
    epoch_index: int = 0
    """Items this rank consumed in the current epoch."""
    micro_seen: int = 0
    loss: float = float("nan")


class _CountingBatches:
    """Batch sampler that remembers the size of every batch it hands out; the trainer pops one size per
    batch it consumes (batches arrive in order, prefetched or not), so it knows its exact position."""

    def __init__(self, sampler: ResumableSampler, batch_size: int, drop_last: bool):
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.sizes: deque[int] = deque()

    def __iter__(self) -> Iterator[list[Any]]:
        batch: list[Any] = []
        for item in self.sampler:
            batch.append(item)
            if len(batch) == self.batch_size:
                self.sizes.append(len(batch))
                yield batch
                batch = []
        if batch and not self.drop_last:
            self.sizes.append(len(batch))
            yield batch

    def per_epoch(self) -> int:
        """Batches in a whole epoch."""
        n = self.sampler.samples_per_epoch()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


def move_to(batch: Any, device: torch.device) -> Any:
    """Tensors in (nested) dicts, lists and tuples moved to ``device``; everything else as is."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


class Trainer:
    """Trains ``model`` on ``train_dataset``; :meth:`train` returns a :class:`TrainResult`.

    ``tokenizer`` and ``feature_spec`` are attached to every checkpoint and to ``<output>/final/``;
    ``data_hash`` and ``feature_spec_hash`` are recorded in checkpoints and compared on resume."""

    def __init__(
        self,
        config: TrainerConfig,
        model: nn.Module,
        train_dataset: Any,
        collate_fn: Callable[[list[Any]], Any] | None,
        loss_fn: LossFn,
        *,
        sampler: ResumableSampler,
        eval_fn: EvalFn | None = None,
        tracker: Any = None,
        tokenizer: Any = None,
        feature_spec: Mapping[str, Any] | None = None,
        data_hash: str | None = None,
        feature_spec_hash: str | None = None,
    ):
        if not isinstance(sampler, ResumableSampler):
            raise TypeError(
                "sampler must provide __iter__, set_epoch, samples_per_epoch, state_dict and load_state_dict"
            )
        self.config, self.model, self.dataset, self.collate_fn = config, model, train_dataset, collate_fn
        self.loss_fn, self.sampler, self.eval_fn, self.tracker = loss_fn, sampler, eval_fn, tracker
        self.tokenizer, self.feature_spec = tokenizer, feature_spec
        self.lineage = {"data_hash": data_hash, "feature_spec_hash": feature_spec_hash}
        self.checkpoint_root = config.output_dir / "checkpoints"

    # ---- setup ------------------------------------------------------------------------------------
    def _total_steps(self, micro_per_epoch: int) -> int:
        c = self.config
        limits = [c.max_steps] if c.max_steps is not None else []
        if c.epochs is not None:
            limits.append(math.ceil(c.epochs * micro_per_epoch / c.grad_accum))
        return max(1, min(limits))

    def _find_resume_point(self, info: du.DistInfo) -> Path | None:
        """Rank 0 picks the newest valid checkpoint and tells the others (errors reach every rank)."""
        choice: tuple[str | None, str | None] = (None, None)
        if info.is_main:
            try:
                for name in ckpt.clean_incomplete(self.checkpoint_root):
                    log.warning("removed incomplete checkpoint folder %s", name)
                existing = ckpt.list_checkpoints(self.checkpoint_root)
                if not self.config.resume and existing:
                    raise ckpt.CheckpointError(
                        f"{self.checkpoint_root} already holds checkpoints ({existing[-1][1].name}) and resume is "
                        "off: choose a new output folder, or resume"
                    )
                latest = ckpt.find_latest_valid(self.checkpoint_root) if self.config.resume else None
                choice = (str(latest) if latest else None, None)
            except Exception as exc:
                if not info.distributed:
                    raise
                choice = (None, f"{type(exc).__name__}: {exc}")  # the other ranks fail too instead of hanging
        path, error = du.broadcast_object(choice)
        if error:
            raise ckpt.CheckpointError(error)
        return Path(path) if path else None

    def _probe_unused(self, model: nn.Module, batch: Any, device: torch.device, autocast) -> list[str]:
        """Parameters that get no gradient from one forward/backward; RNG, buffers and grads are restored,
        so the probe does not change the training run."""
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        with ckpt.preserved_rng(device), autocast():
            loss, _ = self.loss_fn(model, batch)
            loss.backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
        return unused

    def _autocast(self, device: torch.device):
        if device.type == "cuda" and self.config.bf16 and torch.cuda.is_bf16_supported():
            return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext  # never autocast on CPU: bf16 there is slow and changes the numbers

    def _stream(self, epoch: int, info: du.DistInfo, device: torch.device) -> Iterator[tuple[Any, int, int]]:
        """Micro-batches forever, from the sampler's current position: (batch, its epoch, its size)."""
        empty_epochs = 0
        while True:
            batches = _CountingBatches(self.sampler, self.config.batch_size, self.config.drop_last)
            # The loader's worker seeds come from this generator, not from the global RNG, so creating a
            # loader mid-epoch on resume draws nothing from the training RNG streams.
            generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch * 1009 + info.rank)
            loader = DataLoader(
                self.dataset,
                batch_sampler=batches,
                collate_fn=self.collate_fn,
                num_workers=self.config.num_workers,
                pin_memory=device.type == "cuda",
                generator=generator,
            )
            produced = 0
            for batch in loader:
                produced += 1
                yield batch, epoch, batches.sizes.popleft()
            empty_epochs = 0 if produced else empty_epochs + 1
            if empty_epochs > 1:
                raise RuntimeError("the sampler yields no full batch in an epoch: dataset too small for batch_size")
            epoch += 1
            self.sampler.set_epoch(epoch)

    # ---- the loop ---------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run (or resume) training to the configured length; export ``<output>/final/`` on rank 0."""
        c = self.config
        info = du.dist_info_from_env()
        device = du.resolve_device(c.device, info)
        owns_group = info.distributed and not torch.distributed.is_initialized()
        du.init_distributed(device, info)
        try:
            return self._train(info, device)
        finally:
            if owns_group:
                du.teardown()

    def _train(self, info: du.DistInfo, device: torch.device) -> TrainResult:
        c = self.config
        if c.cpu_threads:
            torch.set_num_threads(c.cpu_threads)
        if c.tune_malloc and device.type == "cpu":
            _tune_malloc()
        ckpt.seed_everything(c.seed + info.rank)
        if info.is_main:
            c.output_dir.mkdir(parents=True, exist_ok=True)
        micro_per_epoch = _CountingBatches(self.sampler, c.batch_size, c.drop_last).per_epoch()
        if micro_per_epoch == 0:
            raise ValueError(f"{self.sampler.samples_per_epoch()} samples per rank give no batch of {c.batch_size}")
        total = self._total_steps(micro_per_epoch)
        model = self.model.to(device)
        freeze_parameters(model, c.freeze)
        optimizer = build_adamw(model, c.lr, c.weight_decay, c.adam_betas, c.adam_eps, c.fused_adamw, c.lr_multipliers)
        scheduler = warmup_linear_decay(optimizer, resolve_warmup(total, c.warmup_steps, c.warmup_fraction), total)
        run = _Progress()
        resumed_from = self._find_resume_point(info)
        if info.is_main and resumed_from is None:  # a fresh run: no curve of an earlier one
            (c.output_dir / HISTORY).unlink(missing_ok=True)
        self.sampler.set_epoch(0)
        rng_state = None
        if resumed_from is not None:
            rng_state = self._restore(resumed_from, model, optimizer, scheduler, run, info)
            if info.is_main:
                log.info("resumed from %s (step %d of %d, epoch %d)", resumed_from, run.step, total, run.epoch)
        stream = self._stream(run.epoch, info, device)
        autocast = self._autocast(device)
        if rng_state is not None:  # last: nothing above may draw from the restored streams
            ckpt.restore_rng(rng_state, device)
        train_model, stream = self._wrap(model, stream, info, device, autocast, probe=run.step < total)
        if self.tracker is not None:
            derived = {"total_steps": total, "world_size": info.world_size, "micro_batches_per_epoch": micro_per_epoch}
            self.tracker.log_params(derived, prefix="trainer")

        params = [p for p in model.parameters() if p.requires_grad]
        samples_per_step = c.batch_size * c.grad_accum * info.world_size
        show = info.is_main and c.progress
        bar = tqdm(total=total, initial=run.step, disable=not show, desc="train", dynamic_ncols=True)
        first_step, seconds, checkpoint, eval_metrics, last_row = run.step, 0.0, None, {}, {}
        while run.step < total:
            t0 = time.perf_counter()
            model.train()
            loss_sum, parts = torch.zeros((), device=device), dict[str, float]()
            for micro in range(c.grad_accum):
                batch, epoch, size = next(stream)
                run.epoch_index = run.epoch_index + size if epoch == run.epoch else size
                run.epoch = epoch
                last = micro == c.grad_accum - 1 or not isinstance(train_model, DistributedDataParallel)
                with contextlib.nullcontext() if last else train_model.no_sync():
                    with autocast():  # DDP syncs gradients only on the last micro-batch of a step
                        loss, metrics = self.loss_fn(train_model, move_to(batch, device))
                    (loss / c.grad_accum).backward()
                loss_sum += loss.detach().float()
                for k, v in metrics.items():
                    parts[k] = parts.get(k, 0.0) + float(v) / c.grad_accum
                run.micro_seen += 1
            grad_norm = torch.nn.utils.clip_grad_norm_(params, c.clip_norm) if c.clip_norm else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            run.step += 1
            seconds += time.perf_counter() - t0
            bar.update(1)
            if run.step % c.log_every == 0 or run.step == total:
                row: dict[str, float] = {"loss": loss_sum.item() / c.grad_accum, **parts}
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                row = du.all_reduce_mean(row, device)
                run.loss = row["loss"]
                row["lr"] = float(scheduler.get_last_lr()[0])
                row["samples_per_s"] = (run.step - first_step) * samples_per_step / max(seconds, 1e-9)
                row["epoch"] = run.micro_seen / micro_per_epoch
                bar.set_postfix(loss=f"{run.loss:.4f}", lr=f"{row['lr']:.2e}")
                last_row = dict(row)
                self._log({f"train/{k}": v for k, v in row.items()}, run.step, info)
            if self.eval_fn is not None and (run.step == total or (c.eval_every and run.step % c.eval_every == 0)):
                eval_metrics = self._evaluate(model, run.step, device, info)
            # The last step's checkpoint is skipped when it would be deleted right after final/ is written.
            last_is_discarded = run.step == total and not c.keep_checkpoints and c.export_final
            if (run.step % c.checkpoint_every == 0 or run.step == total) and not last_is_discarded:
                state = self._training_state(run, optimizer, scheduler, info, device)
                checkpoint = self._save(model, run.step, state, info)
        bar.close()
        if info.is_main:
            self._draw_curves()
        final_dir = self._export_final(model, run.step, info)
        du.barrier()
        if not c.keep_checkpoints and final_dir is not None and info.is_main:
            shutil.rmtree(self.checkpoint_root, ignore_errors=True)
            checkpoint = None
        return TrainResult(
            steps=run.step,
            epochs=run.micro_seen / micro_per_epoch,
            final_loss=run.loss,
            samples_per_s=(run.step - first_step) * samples_per_step / seconds if seconds else 0.0,
            checkpoint=checkpoint
            or (ckpt.find_latest_valid(self.checkpoint_root, set_aside_corrupt=False) if c.keep_checkpoints else None),
            final_dir=final_dir,
            resumed_from=resumed_from,
            resumed_step=first_step,
            world_size=info.world_size,
            seconds=seconds,
            eval_metrics=eval_metrics,
            metrics=last_row,
        )

    def _training_state(self, run: _Progress, optimizer, scheduler, info: du.DistInfo, device) -> dict[str, Any]:
        """Everything but the weights, for ``training_state.pt``: per-rank sampler positions and RNG states are
        gathered from every rank (a collective: all ranks call this)."""
        return {
            **asdict(run),
            "world_size": info.world_size,
            "lineage": self.lineage,
            "config": self.config.to_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "sampler": du.gather_objects(self.sampler.state_dict(index=run.epoch_index)),
            "rng": du.gather_objects(ckpt.capture_rng(device)),
        }

    def _restore(self, folder: Path, model, optimizer, scheduler, run: _Progress, info: du.DistInfo) -> dict | None:
        """Load a checkpoint's model, optimizer, scheduler, position and sampler; returns this rank's RNG
        state (restored by the caller last), or None when the world size changed (no exact resume then)."""
        state = ckpt.load_training_state(folder)
        ckpt.check_lineage(state["lineage"], self.lineage, self.config.force_resume, folder)
        ckpt.load_model_weights(model, folder)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for name in ("step", "epoch", "epoch_index", "micro_seen", "loss"):
            setattr(run, name, state[name])
        exact = state["world_size"] == info.world_size
        if not exact:  # the sampler splits the rest of the epoch over the new ranks
            log.warning("resuming a %d-process run with %d processes: not exact", state["world_size"], info.world_size)
            run.epoch_index = math.ceil(run.epoch_index * state["world_size"] / info.world_size)
        self.sampler.load_state_dict(state["sampler"][info.rank if exact else 0])
        return state["rng"][info.rank] if exact else None

    def _wrap(self, model, stream, info: du.DistInfo, device, autocast, probe: bool):
        """DDP around ``model`` when distributed.  ``find_unused_parameters=None`` probes the first batch
        (which then still goes to training) and turns it on only if some parameter gets no gradient."""
        if not info.distributed:
            return model, stream
        find_unused = self.config.find_unused_parameters
        if find_unused is None and probe:
            first = next(stream)
            unused = self._probe_unused(model, move_to(first[0], device), device, autocast)
            find_unused = du.any_rank(bool(unused), device)
            if info.is_main and unused:
                log.info("%d parameter tensors get no gradient (e.g. %s): DDP will find them", len(unused), unused[0])
            stream = _prepend(first, stream)
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=bool(find_unused)), stream

    # ---- helpers ------------------------------------------------------------------------------------
    def _log(self, metrics: dict[str, float], step: int, info: du.DistInfo) -> None:
        if not info.is_main:
            return
        log.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        with (self.config.output_dir / HISTORY).open("a") as f:  # survives restarts: a resumed run appends
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=step)

    def _draw_curves(self) -> Path | None:
        """``<output>/training_curves.png`` (and in MLflow): every loss of the run against the step."""
        from components.metrics.pictures import training_curves_png

        series = loss_series(self.config.output_dir / HISTORY)
        if not series:
            return None
        png = training_curves_png(self.config.output_dir, series, title=self.config.output_dir.name)
        if self.tracker is not None:
            self.tracker.log_artifact(png, "curves")
        return png

    def _evaluate(self, model: nn.Module, step: int, device: torch.device, info: du.DistInfo) -> dict[str, float]:
        assert self.eval_fn is not None
        with ckpt.preserved_rng(device), torch.no_grad():
            model.eval()
            metrics = {k: float(v) for k, v in self.eval_fn(model, step).items()}
            model.train()
        self._log({f"eval/{k}": v for k, v in metrics.items()}, step, info)
        return metrics

    def _save(self, model: nn.Module, step: int, state: dict, info: du.DistInfo) -> Path:
        folder = self.checkpoint_root / ckpt.checkpoint_name(step)
        if info.is_main:
            ckpt.write_checkpoint(self.checkpoint_root, step, model, state, self.tokenizer, self.feature_spec)
            for old in ckpt.prune(self.checkpoint_root, self.config.keep_last):
                log.debug("deleted old checkpoint %s", old.name)
            log.info("checkpoint %s", folder)
        du.barrier()  # nobody runs ahead of a checkpoint that may be resumed from
        return folder

    def _export_final(self, model: nn.Module, step: int, info: du.DistInfo) -> Path | None:
        """``<output>/final/``: written as ``final.tmp/`` and swapped in, so a good export is never lost."""
        if not self.config.export_final:
            return None
        final = self.config.output_dir / "final"
        if info.is_main:
            tmp, old = final.with_name("final.tmp"), final.with_name("final.old")
            for leftover in (tmp, old):
                shutil.rmtree(leftover, ignore_errors=True)
            ckpt.save_model_dir(model, tmp, self.tokenizer, self.feature_spec, metadata={"step": str(step)})
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        return final


NOT_LOSSES = frozenset({"grad_norm", "lr", "samples_per_s", "epoch"})
HISTORY = "history.jsonl"
"""Every logged row of a run, one JSON object per line (``step`` and the ``train/`` / ``eval/`` metrics)."""


def loss_series(path: Path) -> dict[str, tuple[list[float], list[float]]]:
    """``{metric: (steps, values)}`` of every loss in a history file (each objective's part too; not the
    bookkeeping: grad norm, lr, throughput, epoch); a step logged again (by a run resumed from an earlier
    checkpoint) keeps its last value."""
    if not path.exists():
        return {}
    by_step: dict[int, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_step.setdefault(int(row.pop("step")), {}).update(row)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for step in sorted(by_step):
        for key, value in by_step[step].items():
            if key.rpartition("/")[2] not in NOT_LOSSES:
                xs, ys = series.setdefault(key, ([], []))
                xs.append(float(step))
                ys.append(float(value))
    return series


def _tune_malloc() -> None:
    """glibc mallopt settings measured in benchmarks/training.py (no-op where libc is not glibc)."""
    from components.training.malloc import tune_malloc

    try:
        tune_malloc("tuned")
    except OSError as exc:  # musl, macOS: nothing to tune
        log.debug("malloc not tuned: %s", exc)


def _prepend(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


__all__ = ["ResumableSampler", "Trainer", "TrainerConfig", "TrainResult", "move_to"]
