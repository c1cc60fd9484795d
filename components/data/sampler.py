"""A distributed sampler that can start in the middle of an epoch, so a resumed run continues exactly.

Order of an epoch: ``torch.randperm(n)`` from a generator seeded with ``seed + epoch`` (``arange(n)`` without
shuffling), exactly as ``torch.utils.data.DistributedSampler``; then padded by repeating its head to a multiple
of the world size (or cut to one, ``drop_last``), and rank r takes every world-size-th entry from r.  For a run
that starts at the beginning of an epoch the indices are those of ``DistributedSampler`` (by default each comes
as an ``(epoch, index)`` pair, which the datasets of :mod:`components.data` take; ``with_epoch=False``: plain ints).

Position: ranks consume in lockstep, so after each rank has consumed ``index`` samples of an epoch the first
``index * world_size`` entries of the epoch's order are done.  :meth:`set_position` / :meth:`state_dict` keep
that global position, so a run may even resume under another world size: the remaining entries are split over
the new ranks (padded again so every rank gets as many).

The sampler does not count what it yields (a DataLoader prefetches, so yielded is not trained): the trainer
states the position it has really reached, ``sampler.state_dict(index=samples_this_rank_consumed)``, or calls
``set_position`` before ``state_dict()``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import Sampler

STATE_VERSION = 1


def _world() -> tuple[int, int]:
    """(rank, world size): torch.distributed when initialised, else RANK / WORLD_SIZE (torchrun), else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class ResumableDistributedSampler(Sampler[Any]):
    """Shuffles per (seed, epoch), splits across ranks, and starts anywhere in an epoch.

    ``data``: the dataset (or its length).  ``with_epoch`` (default): yield ``(epoch, index)`` pairs, which every
    dataset in :mod:`components.data` accepts, so items get the sampler's epoch without anyone calling the
    dataset's ``set_epoch`` (and even when DataLoader workers persist across epochs); ``False`` yields plain
    indices, for datasets that take ints only (then call their ``set_epoch`` yourself).
    """

    def __init__(
        self,
        data: Sized | int,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        with_epoch: bool = True,
    ):
        self.num_samples = data if isinstance(data, int) else len(data)
        env_rank, env_world = _world()
        self.num_replicas = env_world if num_replicas is None else num_replicas
        self.rank = env_rank if rank is None else rank
        if self.num_samples < 1:
            raise ValueError("the sampler needs a non-empty dataset")
        if self.num_replicas < 1 or not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is not in a world of {self.num_replicas}")
        if drop_last and self.num_samples < self.num_replicas:
            raise ValueError(f"drop_last with {self.num_samples} samples leaves nothing for {self.num_replicas} ranks")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.shuffle, self.seed, self.drop_last, self.with_epoch = shuffle, seed, drop_last, with_epoch
        self.epoch = 0
        self.start = 0  # entries of the epoch's order already consumed (over all ranks)

    # -- the epoch's order -------------------------------------------------------------------------------------

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def _epoch_end(self) -> int:
        """Entries of the unpadded order that the epoch uses (all of them, or a multiple of the world size)."""
        if self.drop_last:
            return self.num_samples - self.num_samples % self.num_replicas
        return self.num_samples

    def _remaining(self) -> list[int]:
        """This epoch's entries from the current position on, padded for the current world size."""
        order = self._order(self.epoch)
        rest = order[min(self.start, self._epoch_end()) : self._epoch_end()]
        pad = -len(rest) % self.num_replicas
        if pad:  # repeat the epoch's head, as DistributedSampler does (cyclically when the head is short)
            rest += (order * math.ceil(pad / len(order)))[:pad]
        return rest

    def __iter__(self) -> Iterator[Any]:
        mine = self._remaining()[self.rank :: self.num_replicas]
        if self.with_epoch:
            return iter([(self.epoch, index) for index in mine])
        return iter(mine)

    def __len__(self) -> int:
        """Samples this rank yields from the current position to the end of the epoch."""
        left = max(self._epoch_end() - self.start, 0)
        return math.ceil(left / self.num_replicas)

    def samples_per_epoch(self) -> int:
        """Samples each rank gets in a whole epoch."""
        return math.ceil(self._epoch_end() / self.num_replicas)

    # -- position ---------------------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (call before each epoch, as with DistributedSampler)."""
        self.set_position(epoch, 0)

    def set_position(self, epoch: int, index: int) -> None:
        """Continue ``epoch`` after this rank has consumed ``index`` samples of it (every rank as many)."""
        if epoch < 0 or index < 0:
            raise ValueError(f"epoch and index must be >= 0, got {(epoch, index)}")
        if index > self.samples_per_epoch():
            raise ValueError(f"index {index} is past the end of the epoch ({self.samples_per_epoch()} per rank)")
        self.epoch, self.start = int(epoch), int(index) * self.num_replicas

    @property
    def index(self) -> int:
        """Samples this rank has consumed in the current epoch (the position set last)."""
        return math.ceil(self.start / self.num_replicas)

    def state_dict(self, index: int | None = None) -> dict[str, Any]:
        """The position (and the settings that define the order), JSON-serialisable.

        ``index``: samples this rank has consumed in the current epoch; default: the position set last."""
        start = self.start if index is None else int(index) * self.num_replicas
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "consumed": min(start, self.num_samples),
            "num_samples": self.num_samples,
            "num_replicas": self.num_replicas,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` stopped; refuses a state for another dataset size, seed or order."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown sampler state version {state.get('version')!r}")
        for name in ("num_samples", "seed", "shuffle", "drop_last"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"sampler state was saved with {name}={state[name]!r}, this sampler has {getattr(self, name)!r}"
                )
        self.epoch, self.start = int(state["epoch"]), int(state["consumed"])
