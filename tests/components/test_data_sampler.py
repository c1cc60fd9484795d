"""The resumable distributed sampler: same order as DistributedSampler, exact resume, world-size changes."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from components.data.collate import Collator
from components.data.pretraining import PretrainingDataset, validated_captions
from components.data.sampler import ResumableDistributedSampler
from tests.components.test_data_world import World, shared_world


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return shared_world(tmp_path_factory)


def epoch_of(n: int, world_size: int, epoch: int, **kw) -> list[list[int]]:
    out = []
    for rank in range(world_size):
        s = ResumableDistributedSampler(n, num_replicas=world_size, rank=rank, with_epoch=False, **kw)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


@pytest.mark.parametrize(
    ("n", "world_size", "drop_last"), [(23, 4, False), (23, 4, True), (3, 5, False), (40, 1, False)]
)
def test_a_fresh_epoch_is_exactly_distributed_sampler(n: int, world_size: int, drop_last: bool) -> None:
    for epoch in (0, 3):
        for rank, got in enumerate(epoch_of(n, world_size, epoch, seed=7, drop_last=drop_last)):
            ref = DistributedSampler(range(n), num_replicas=world_size, rank=rank, seed=7, drop_last=drop_last)
            ref.set_epoch(epoch)
            assert got == list(ref), (epoch, rank)
            assert len(got) == len(ref)


def test_ranks_partition_the_epoch_and_epochs_differ() -> None:
    ranks = epoch_of(23, 4, 0, seed=1)
    assert len({len(r) for r in ranks}) == 1  # equal lengths (padding)
    flat = [i for r in ranks for i in r]
    assert sorted(set(flat)) == list(range(23)) and len(flat) == 24  # one repeat pads 23 to 24
    assert ranks != epoch_of(23, 4, 1, seed=1) and epoch_of(23, 4, 0, seed=1) == ranks
    assert epoch_of(5, 1, 0, shuffle=False) == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("world_size", [1, 3])
def test_resuming_mid_epoch_continues_exactly(world_size: int) -> None:
    for rank in range(world_size):
        full = ResumableDistributedSampler(50, num_replicas=world_size, rank=rank, seed=3, with_epoch=False)
        full.set_epoch(2)
        whole = list(full)
        saved = json.loads(json.dumps(full.state_dict(index=7)))  # a checkpoint after 7 samples of this rank
        resumed = ResumableDistributedSampler(50, num_replicas=world_size, rank=rank, seed=3, with_epoch=False)
        resumed.load_state_dict(saved)
        assert (resumed.epoch, resumed.index) == (2, 7)
        assert list(resumed) == whole[7:] and len(resumed) == len(whole) - 7
        resumed.set_position(2, len(whole))
        assert list(resumed) == [] and len(resumed) == 0


def test_resuming_under_another_world_size_covers_the_rest_of_the_epoch() -> None:
    n, before, after = 30, 2, 3
    done = []
    for rank in range(before):
        s = ResumableDistributedSampler(n, num_replicas=before, rank=rank, seed=5, with_epoch=False)
        s.set_epoch(1)
        done += list(s)[:4]
    state = ResumableDistributedSampler(n, num_replicas=before, rank=0, seed=5).state_dict()
    state.update(epoch=1, consumed=4 * before)
    rest = []
    for rank in range(after):
        s = ResumableDistributedSampler(n, num_replicas=after, rank=rank, seed=5, with_epoch=False)
        s.load_state_dict(state)
        rest += list(s)
    # 8 done; the 22 left are padded to 24 for 3 ranks with the epoch's first 2 entries (as DistributedSampler pads)
    assert len(done) == 8 and len(rest) == 24 and sorted(set(done + rest)) == list(range(n))
    head = ResumableDistributedSampler(n, num_replicas=1, rank=0, seed=5, with_epoch=False)
    head.set_epoch(1)
    assert sorted(done + rest) == sorted([*range(n), *list(head)[:2]])


def test_state_of_another_order_is_refused() -> None:
    state = ResumableDistributedSampler(10, num_replicas=1, rank=0, seed=0).state_dict()
    with pytest.raises(ValueError, match="num_samples=10"):
        ResumableDistributedSampler(11, num_replicas=1, rank=0).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=0"):
        ResumableDistributedSampler(10, num_replicas=1, rank=0, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        ResumableDistributedSampler(10, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="past the end"):
        ResumableDistributedSampler(10, num_replicas=2, rank=0).set_position(0, 6)


def test_rank_and_world_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    s = ResumableDistributedSampler(6, shuffle=False)
    assert (s.rank, s.num_replicas, list(s)) == (1, 2, [(0, 1), (0, 3), (0, 5)])  # (epoch, index) by default
    s.set_position(2, 1)
    assert list(s) == [(2, 3), (2, 5)]


def test_a_resumed_loader_yields_identical_batches(world: World) -> None:
    """Two ranks, stop after 2 batches, resume from the saved state: the rest of the epoch is bit-identical."""
    ds = PretrainingDataset(validated_captions(world.validation), world.regions(), world.tokenizer)
    collate = Collator(pad_token_id=ds.tokenizer.pad_token_id)
    for rank in range(2):
        sampler = ResumableDistributedSampler(ds, num_replicas=2, rank=rank, seed=11)
        sampler.set_epoch(4)
        reference = list(DataLoader(ds, batch_size=3, sampler=sampler, collate_fn=collate))
        state = sampler.state_dict(index=2 * 3)
        again = ResumableDistributedSampler(ds, num_replicas=2, rank=rank, seed=11)
        again.load_state_dict(state)
        resumed = list(DataLoader(ds, batch_size=3, sampler=again, collate_fn=collate))
        assert len(resumed) == len(reference) - 2
        for a, b in zip(reference[2:], resumed, strict=True):
            assert a["meta"]["caption_id"] == b["meta"]["caption_id"]
            for key in ("input_ids", "masked_lm_labels", "features", "region_labels", "alignment_labels"):
                assert torch.equal(a[key], b[key]), key
