"""Bound the retries of a row that kills its featurize actor every time (a poison row).

Ray Data's pool actors restart and retry their batch without bound, so one row that crashes
the process (a decoder or kernel fault, an OOM on one input) would retry forever. The
`DeathRegistry` (one small actor per job, on the driver's node) counts, per record, the
batches that began and never ended: each such begin is one actor death with that record in
the batch.

    deaths(row) < N          the batch is featurized as usual
    deaths(row) >= N         the batch's rows with N deaths are featurized one by one, alone
                             (bisection down to single rows in one step); a row that has
                             killed its actor once alone as well is rejected with the reason
                             "worker died N+1 times ..." - the job goes on and finishes

So a poison row costs N + 1 actor restarts and ends in the shard's rejects table; its
batch-mates are featurized (those that share its batch are retried alone, never rejected
unless they die alone too). N = job.max_worker_deaths (3).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

REASON = "worker died {deaths} times featurizing this row (job.max_worker_deaths={limit})"


class DeathRegistry:
    """Ray actor: record id -> batches begun without an end (deaths)."""

    def __init__(self) -> None:
        self.open: dict[str, int] = {}

    def begin(self, ids: list[str]) -> list[int]:
        """The deaths of each id so far; counts this begin."""
        out = [self.open.get(i, 0) for i in ids]
        for i in ids:
            self.open[i] = self.open.get(i, 0) + 1
        return out

    def end(self, ids: list[str]) -> None:
        for i in ids:
            self.open.pop(i, None)


def start_registry():
    """A DeathRegistry on the driver's node (0 CPUs; it dies with the driver)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, scheduling_strategy=here, max_restarts=0)(DeathRegistry).remote()


def record_ids(batch: dict[str, np.ndarray]) -> list[str]:
    return [f"{s}/{int(r)}" for s, r in zip(batch["shard"], batch["row"], strict=True)]


def take(batch: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {name: column[index] for name, column in batch.items()}


def guarded(
    batch: dict[str, np.ndarray],
    featurize: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    registry,
    limit: int,
) -> dict[str, np.ndarray]:
    """featurize(batch), or - for rows with `limit` deaths - each such row alone, rejecting
    one that died alone before (module doc). Same output columns and row order."""
    import ray

    ids = record_ids(batch)
    deaths = np.array(ray.get(registry.begin.remote(ids)))  # (B,)
    suspects = np.flatnonzero(deaths >= limit)
    if not len(suspects):
        out = featurize(batch)
        ray.get(registry.end.remote(ids))
        return out
    rest = np.setdiff1d(np.arange(len(ids)), suspects)
    parts: dict[int, dict[str, np.ndarray]] = {}
    if len(rest):
        together = featurize(take(batch, rest))
        for j, i in enumerate(rest):
            parts[int(i)] = take(together, np.array([j]))
    for i in suspects:
        alone = f"alone:{ids[i]}"
        (before,) = ray.get(registry.begin.remote([alone]))
        single = take(batch, np.array([i]))
        if before >= 1 and not single["reason"][0]:  # it killed its actor alone too
            reason = REASON.format(deaths=limit + before, limit=limit)
            single["reason"] = np.array([reason], dtype=object)  # passes through, unread
        parts[int(i)] = featurize(single)
        ray.get(registry.end.remote([alone]))
    ray.get(registry.end.remote(ids))
    order = [parts[i] for i in range(len(ids))]
    return {name: np.concatenate([p[name] for p in order]) for name in order[0]}
