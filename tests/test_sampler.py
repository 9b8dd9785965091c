"""The resumable distributed sampler: coverage, disjoint ranks, determinism, mid-epoch resume."""
from collections import Counter

import pytest

from paddlerun.trainer.sampler import ResumableBatchSampler, shard_indices


def plan(size, batch, world, seed=7, epoch=0, start=0, drop_last=False):
    """Each rank's batches for one epoch: {rank: [[indices], ...]}."""
    out = {}
    for rank in range(world):
        s = ResumableBatchSampler(size, batch, world, rank, seed=seed, drop_last=drop_last)
        s.set_epoch(epoch, start)
        out[rank] = list(s)
    return out


@pytest.mark.parametrize("size,batch,world", [(100, 10, 2), (101, 10, 2), (97, 12, 4),
                                              (5, 4, 2), (1, 2, 2), (64, 64, 1), (130, 8, 8)])
def test_every_sample_once_per_epoch_and_ranks_disjoint(size, batch, world):
    per_rank = plan(size, batch, world)
    steps = {len(b) for b in per_rank.values()}
    assert steps == {-(-size // batch)}, "every rank runs the same number of steps"
    seen = Counter()
    for step in range(steps.pop()):
        sizes = {len(per_rank[r][step]) for r in range(world)}
        assert len(sizes) == 1, "every rank gets an equal share of each global batch"
        for r in range(world):
            seen.update(per_rank[r][step])
    assert set(seen) == set(range(size)), "every sample is covered"
    padding = sum(seen.values()) - size
    assert padding == (-(size % batch) % world if size % batch else 0)
    assert padding < world
    if padding == 0:
        assert all(c == 1 for c in seen.values())


def test_ranks_are_disjoint_within_a_full_batch():
    per_rank = plan(96, 16, 4)
    for step in range(6):
        shares = [set(per_rank[r][step]) for r in range(4)]
        assert sum(map(len, shares)) == len(set().union(*shares)) == 16


def test_global_batch_does_not_depend_on_world_size():
    one = plan(100, 8, 1)[0]
    four = plan(100, 8, 4)
    for step in range(12):  # full batches: the same samples, however many workers
        assert sorted(one[step]) == sorted(sum((four[r][step] for r in range(4)), []))


def test_deterministic_by_seed_and_epoch():
    assert plan(50, 6, 2, seed=1, epoch=3) == plan(50, 6, 2, seed=1, epoch=3)
    assert plan(50, 6, 2, seed=1, epoch=3) != plan(50, 6, 2, seed=1, epoch=4)
    assert plan(50, 6, 2, seed=1) != plan(50, 6, 2, seed=2)


@pytest.mark.parametrize("start", [0, 1, 7, 12, 13])
def test_offset_resumes_exactly_the_remaining_order(start):
    full = plan(101, 8, 2, epoch=2)
    resumed = plan(101, 8, 2, epoch=2, start=start)
    for rank in range(2):
        assert resumed[rank] == full[rank][start:]


def test_len_counts_remaining_batches_and_drop_last():
    s = ResumableBatchSampler(101, 10, 2, 0, seed=0, drop_last=True)
    assert s.batches_per_epoch == 10
    s.set_epoch(0, 4)
    assert len(s) == len(list(s)) == 6
    assert ResumableBatchSampler(101, 10, 2, 0, seed=0).batches_per_epoch == 11


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="global_batch_size=10 is not divisible by the 3 workers"):
        ResumableBatchSampler(100, 10, 3, 0, seed=0)
    s = ResumableBatchSampler(100, 10, 2, 0, seed=0)
    with pytest.raises(ValueError, match="start_batch"):
        s.set_epoch(0, 11)


def test_eval_shards_are_disjoint_and_cover():
    shards = [shard_indices(11, 3, r) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))
