"""Fault injection for the reliability tests: `CTRAK_FAULT` names faults, `;`-separated.

    actor-exit:shard=00001:row=2:once=/tmp/m   a featurize actor exits hard (os._exit, no
                                               cleanup) when its batch holds that record;
                                               `once=` an (absent) marker file: fire once;
                                               without it: every time (a poison row; a
                                               record already rejected never fires)
    driver-kill:after=1                        the featurize/reindex driver SIGKILLs itself
                                               right after writing its N-th shard
    nan:key=000010002                          a featurize actor gives that sample NaN pixels,
                                               so its gradient is non-finite
    scan-stall:seconds=20:once=/tmp/m          a query's score task sleeps before it scans
                                               (a node can be removed under it); `once=`
                                               as above

Unset (production), every hook is a no-op. The driver forwards the variable to the featurize
actors (`actor_env`), whose processes the Ray cluster started before it was set.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import torch

ENV = "CTRAK_FAULT"


def faults(kind: str) -> list[dict[str, str]]:
    """The `kind` entries of CTRAK_FAULT as {field: value} dicts."""
    out = []
    for item in os.environ.get(ENV, "").split(";"):
        name, *fields = item.strip().split(":")
        if name == kind:
            out.append(dict(f.split("=", 1) for f in fields))
    return out


def actor_env() -> dict:
    """Ray remote args that hand CTRAK_FAULT to the featurize actors ({} when unset)."""
    spec = os.environ.get(ENV, "")
    return {"runtime_env": {"env_vars": {ENV: spec}}} if spec else {}


def _first_time(fault: dict[str, str]) -> bool:
    """True unless the fault's `once` marker exists; creates it (atomically) when absent."""
    if "once" not in fault:
        return True
    try:
        os.close(os.open(fault["once"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def actor_exit(batch: dict[str, np.ndarray]) -> None:
    """`actor-exit`: end this process at once when the batch holds (shard, row)."""
    for fault in faults("actor-exit"):
        hit = (batch["shard"] == fault["shard"]) & (batch["row"] == int(fault["row"]))
        hit &= np.asarray(batch.get("reason", np.full(len(hit), "")) == "", dtype=bool)
        if hit.any() and _first_time(fault):
            os._exit(1)


def poison(keys: np.ndarray, images: torch.Tensor) -> torch.Tensor:
    """`nan`: images (G, 3, S, S) with the named keys' pixels set to NaN."""
    for fault in faults("nan"):
        images[torch.from_numpy(np.asarray(keys == fault["key"], dtype=bool))] = float("nan")
    return images


def driver_kill(written: int) -> None:
    """`driver-kill`: SIGKILL this process after its `after`-th written shard."""
    for fault in faults("driver-kill"):
        if written >= int(fault["after"]):
            os.kill(os.getpid(), signal.SIGKILL)


def scan_stall() -> None:
    """`scan-stall`: sleep `seconds` in a query's score task (once with `once=`)."""
    import time

    for fault in faults("scan-stall"):
        if _first_time(fault):
            time.sleep(float(fault["seconds"]))
