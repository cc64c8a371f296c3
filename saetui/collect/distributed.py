"""The processes of one collection: a single process, or the ranks of a ``torchrun`` job.

``torchrun --nproc-per-node N -m saetui collect ...`` (and ``--nnodes`` with a rendezvous
for several machines) starts N processes that each collect the windows
:class:`~saetui.index.layout.ShardLayout` deals them into their own shard. They meet at
*sync points*, one small all-reduce on a gloo group (CPU tensors, so it never waits on a
GPU stream): after every batch, between neighbour groups and around every collective.
A sync carries each rank's token count (one rank reports progress for the job), whether
it has more to do, a stop request (a signal on any rank stops all of them at the same
point) and a failure: a rank that raises joins the next sync with its message instead,
every rank closes its writer (each shard stays resumable) and the main rank prints one
sentence naming the failed rank. Every collective below begins with a sync, so a rank
that failed in local work is never awaited in a data exchange it will not reach.

The pipeline is written against :class:`Team`; the single-process case is the base class,
whose syncs only check the local stop request.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import numpy as np
import scipy.sparse as sp

from saetui.collect.job import StopRequested
from saetui.errors import SaetuiInputError
from saetui.index.layout import ShardLayout


class RankFailed(Exception):
    """Another rank of the job failed; this one stopped at the sync where it learnt it."""

    def __init__(self, rank: int, message: str, exit_code: int) -> None:
        super().__init__(f"rank {rank} failed: {message}")
        self.rank, self.message, self.exit_code = rank, message, exit_code


@dataclass
class Sync:
    """What a sync point learnt: the job's tokens and whether any rank has more to do."""

    tokens: int
    more: bool


class Team:
    """A collection run by one process (the base of the distributed team)."""

    rank = 0
    world = 1

    def __init__(self, should_stop: Callable[[], bool] | None = None) -> None:
        self._should_stop = should_stop or (lambda: False)

    def use_stop_check(self, should_stop: Callable[[], bool]) -> None:
        """The local stop request this process's syncs report."""
        self._should_stop = should_stop

    @property
    def is_main(self) -> bool:
        """Whether this process reports progress and stores job-wide results."""
        return self.rank == 0

    @property
    def layout(self) -> ShardLayout | None:
        """The windows this process collects (None: all of them)."""
        return None

    def sync(self, tokens: int = 0, more: bool = False) -> Sync:
        """A sync point. One process has no one to meet: its stop requests are honoured by
        the pipeline's own checks between batches, loading steps and chunks."""
        return Sync(tokens, more)

    def abort(self, error: BaseException | None) -> None:
        """Tell the other ranks this one stops (error None) or failed, unless they know."""

    def finish(self, quiet: bool = False) -> None:
        """Wait until every rank has reached this point (e.g. closed its writer); ``quiet``:
        on the way out after a stop or failure, learn nothing more."""

    def close(self) -> None:
        """Leave the job."""

    def sum_ints(self, values: list[int]) -> list[int]:
        """Element-wise sums over ranks."""
        self.sync()
        return list(values)

    def sum_array(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum of an int64 or float64 array over ranks."""
        self.sync()
        return array

    def all_agree(self, flag: bool) -> bool:
        """Whether the flag holds on every rank."""
        return self.sum_ints([int(bool(flag))])[0] == self.world

    def row_range(self, n: int) -> tuple[int, int]:
        """This rank's share [lo, hi) of n rows (features) for neighbour work."""
        bounds = row_bounds(n, self.world)
        return bounds[self.rank], bounds[self.rank + 1]

    def exchange_rows(self, pairs: sp.csr_matrix) -> sp.csr_matrix:
        """Sum of every rank's ``pairs`` [n, m] restricted to this rank's rows."""
        self.sync()
        lo, hi = self.row_range(pairs.shape[0])
        return pairs[lo:hi]

    def gather_rows(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """Row blocks of every rank stacked in rank order, on the main rank (None elsewhere)."""
        self.sync()
        return arrays

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        self.sync()
        return [value]


def row_bounds(n: int, world: int) -> list[int]:
    """Boundaries of ``world`` nearly equal, contiguous shares of ``n`` rows."""
    return [n * r // world for r in range(world + 1)]


# ------------------------------------------------------------------ torch.distributed


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a torchrun job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


class TorchTeam(Team):
    """The ranks of a torchrun job (torch.distributed; gloo for everything this module
    sends, NCCL joins for CUDA tensors when the job runs on GPUs)."""

    def __init__(self, should_stop: Callable[[], bool] | None = None, timeout_s: float = 1800):
        import torch
        import torch.distributed as dist

        super().__init__(should_stop)
        self._dist = dist
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # control and data of this module: CPU tensors on a gloo group
        self._group = dist.new_group(backend="gloo") if torch.cuda.is_available() else None
        self._known = False  # the others already know this rank stops (a sync said so)
        self._closed = False
        self._broken = False  # a collective failed: a rank is gone

    @property
    def layout(self) -> ShardLayout | None:
        return ShardLayout(self.rank, self.world)

    @property
    def broken(self) -> bool:
        """Whether a collective failed (another rank is gone: killed, or its machine)."""
        return self._broken

    def _all_reduce(self, tensor: Any) -> None:
        self._dist.all_reduce(tensor, group=self._group)

    def sync(
        self,
        tokens: int = 0,
        more: bool = False,
        *,
        stop: bool | None = None,
        failure: tuple[str, int] | None = None,
    ) -> Sync:
        import torch

        stopping = self._should_stop() if stop is None else stop
        state = torch.zeros(3 + self.world, dtype=torch.int64)
        state[0], state[1], state[2] = int(stopping), int(more), tokens
        state[3 + self.rank] = int(failure is not None)
        self._all_reduce(state)
        failed = torch.nonzero(state[3:]).flatten().tolist()
        if failed:
            first = failed[0]
            box = [failure if self.rank == first else None]
            self._dist.broadcast_object_list(box, src=first, group=self._group)
            self._known = True
            if failure is None:
                message, code = cast("tuple[str, int]", box[0])
                raise RankFailed(first, message, code)
            return Sync(int(state[2]), False)
        if state[0] > 0:
            self._known = True
            if failure is None and stop is None:
                raise StopRequested
            return Sync(int(state[2]), False)
        return Sync(int(state[2]), bool(state[1] > 0))

    def abort(self, error: BaseException | None) -> None:
        if self._known or self._closed or self._broken:
            return
        self._known = True
        stopping = error is None or isinstance(error, (StopRequested, KeyboardInterrupt))
        try:
            if stopping:
                self.sync(stop=True)
            elif isinstance(error, SaetuiInputError):
                self.sync(failure=(str(error), error.exit_code))
            else:
                self.sync(failure=(repr(error), 1))
        except (StopRequested, RankFailed):
            pass  # another rank failed at the same point: this one stops either way
        except Exception:  # a rank is gone (killed): nobody left to tell
            self._broken = True

    def finish(self, quiet: bool = False) -> None:
        if self._closed or self._broken:
            return
        try:
            self.sync(stop=False)  # a sync, not a barrier: it matches a failing rank's abort
        except (StopRequested, RankFailed):
            if not quiet:
                raise
        except Exception:  # a rank is gone (killed)
            self._broken = True
            if not quiet:
                raise

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if not self._broken:
                self._dist.destroy_process_group()

    def sum_ints(self, values: list[int]) -> list[int]:
        import torch

        self.sync()
        tensor = torch.tensor(values, dtype=torch.int64)
        self._all_reduce(tensor)
        return [int(v) for v in tensor.tolist()]

    def sum_array(self, array: np.ndarray) -> np.ndarray:
        import torch

        self.sync()
        tensor = torch.from_numpy(np.ascontiguousarray(array).copy())
        self._all_reduce(tensor)
        return tensor.numpy()

    def exchange_rows(self, pairs: sp.csr_matrix) -> sp.csr_matrix:
        """all_to_all: each rank sends every other rank the rows it owns."""
        import torch

        self.sync()
        dist, group = self._dist, self._group
        bounds = row_bounds(pairs.shape[0], self.world)
        pairs = pairs.tocsr()
        row_nnz = torch.from_numpy(np.diff(pairs.indptr).astype(np.int64))
        rows_out = [bounds[r + 1] - bounds[r] for r in range(self.world)]
        lo, hi = bounds[self.rank], bounds[self.rank + 1]
        received_nnz = torch.empty(self.world * (hi - lo), dtype=torch.int64)
        dist.all_to_all_single(received_nnz, row_nnz, [hi - lo] * self.world, rows_out, group=group)
        send_sizes = [
            int(pairs.indptr[bounds[r + 1]] - pairs.indptr[bounds[r]]) for r in range(self.world)
        ]
        per_source = received_nnz.view(self.world, hi - lo)
        recv_sizes = per_source.sum(1).tolist()
        indices = torch.empty(sum(recv_sizes), dtype=torch.int32)
        data = torch.empty(sum(recv_sizes), dtype=torch.int32)
        dist.all_to_all_single(
            indices,
            torch.from_numpy(pairs.indices.astype(np.int32)),
            recv_sizes,
            send_sizes,
            group=group,
        )
        dist.all_to_all_single(
            data,
            torch.from_numpy(pairs.data.astype(np.int32)),
            recv_sizes,
            send_sizes,
            group=group,
        )
        total: sp.csr_matrix | None = None
        offset = 0
        for source in range(self.world):
            counts = per_source[source].numpy()
            size = int(counts.sum())
            piece = sp.csr_matrix(
                (
                    data[offset : offset + size].numpy(),
                    indices[offset : offset + size].numpy(),
                    np.concatenate([[0], np.cumsum(counts)]),
                ),
                shape=(hi - lo, pairs.shape[1]),
            )
            piece.has_sorted_indices = True
            offset += size
            total = piece if total is None else (total + piece).tocsr()
        assert total is not None
        return total

    def gather_rows(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        parts = self._gather_to_main(arrays)
        if parts is None:
            return None
        return {name: np.concatenate([p[name] for p in parts]) for name in arrays}

    def _gather_to_main(self, value: Any) -> list[Any] | None:
        self.sync()
        out = [None] * self.world if self.is_main else None
        self._dist.gather_object(value, out, dst=0, group=self._group)
        return out

    def gather_objects(self, value: Any) -> list[Any]:
        self.sync()
        out: list[Any] = [None] * self.world
        self._dist.all_gather_object(out, value, group=self._group)
        return out
