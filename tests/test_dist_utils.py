"""The multi-process harness itself: results in rank order, tracebacks, timeouts, recovery."""

import time

import pytest
from dist_utils import DistributedError, run_distributed


def _rank_info(rank, world_size):
    import os

    import torch
    import torch.distributed as dist

    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    return rank, world_size, int(os.environ["RANK"]), torch.get_num_threads(), t.item()


def _raise_on_rank_1(rank, world_size):
    import torch.distributed as dist

    if rank == 1:
        raise KeyError("boom on rank 1")
    dist.barrier()  # rank 0 is now stuck waiting for rank 1: the harness must not hang
    return rank


def _sleep_on_rank_1(rank, world_size, seconds):
    if rank == 1:
        time.sleep(seconds)
    return rank


def test_results_in_rank_order():
    assert run_distributed(_rank_info, 2) == [(0, 2, 0, 1, 3.0), (1, 2, 1, 1, 3.0)]


def test_error_carries_traceback_and_pool_recovers():
    start = time.monotonic()
    with pytest.raises(DistributedError) as info:
        run_distributed(_raise_on_rank_1, 2, timeout=60)
    assert time.monotonic() - start < 30  # the grace period, not the timeout
    message = str(info.value)
    assert "ranks [1] raised" in message and "KeyError: 'boom on rank 1'" in message
    assert "_raise_on_rank_1" in message  # the traceback, with the frame
    assert "ranks [0] did not finish" in message
    assert set(info.value.errors) == {1}
    assert run_distributed(_rank_info, 2)[0][-1] == 3.0  # a fresh pool


def test_timeout():
    with pytest.raises(DistributedError, match=r"ranks \[1\] did not finish within 3 s"):
        run_distributed(_sleep_on_rank_1, 2, 120, timeout=3)
    assert run_distributed(_sleep_on_rank_1, 2, 0) == [0, 1]
