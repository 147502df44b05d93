"""Joining or starting a Ray cluster, Ray Data settings, and errors back from workers.

- `ray_session(config)`: reuse a Ray this process already joined (a test session's, or a
  caller's); else `ray.init(address)` - `address` empty means RAY_ADDRESS when set (inside
  `ray job submit`), otherwise a new local cluster (never a stray one found on the machine) -
  and shut it down afterwards;
- `configure_data(progress)`: the Ray Data settings every job uses (progress bars; no
  silently skipped blocks: a failed block fails the job, whose finished shards are kept);
- `cluster_has_gpus()`: featurize actors ask for num_gpus=1 when it is true;
- `named_errors()`: re-raise the CtrakError (ProvenanceMismatchError, ImageShapeError, ...)
  behind a Ray task or actor error, so the command line reports the named error, not a
  remote traceback.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

from ctrak.errors import CtrakError
from pipeline.config import RayConfig

log = logging.getLogger("ctrak.cluster")


def _runtime_env(path: str) -> dict | None:
    if not path:
        return None
    import yaml

    with open(path) as handle:
        return yaml.safe_load(handle)


@contextmanager
def ray_session(config: RayConfig) -> Iterator[None]:
    """A connected Ray for the duration of the block."""
    import ray

    if ray.is_initialized():
        configure_data(config.progress)
        yield
        return
    address = config.address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(
        address=address,
        runtime_env=_runtime_env(config.runtime_env),
        logging_level=logging.WARNING,
        log_to_driver=True,
    )
    log.info("ray: %s", "started a local cluster" if address == "local" else "joined " + address)
    try:
        configure_data(config.progress)
        yield
    finally:
        ray.shutdown()


def configure_data(progress: bool) -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.max_errored_blocks = 0  # skipped blocks would drop rows silently
    ctx.execution_options.preserve_order = False
    ctx.print_on_execution_start = False


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def _named_errors() -> dict[str, type]:
    """{name: class} of every CtrakError subclass defined so far."""
    found, todo = {}, [CtrakError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def unwrap(err: BaseException) -> BaseException:
    """The CtrakError behind a Ray error, else err. A plain task's error travels as its cause;
    a Ray Data UDF's (wrapped in UserCodeException) and an actor's whose __init__ raised (e.g.
    a worker with another model: ProvenanceMismatchError) only leave the formatted traceback,
    whose last named-error line is rebuilt."""
    seen: set[int] = set()
    node: BaseException | None = err
    while node is not None and id(node) not in seen:
        if isinstance(node, CtrakError):
            return node
        seen.add(id(node))
        node = getattr(node, "cause", None) or node.__cause__ or node.__context__
    if not type(err).__module__.startswith("ray."):
        return err  # a local error: its text is not a worker's traceback
    named = _named_errors()
    text = str(getattr(err, "error_msg", "") or err)
    lines = re.findall(r"(?:^|[\s.])(\w+Error): (.+)", text)
    for name, message in reversed(lines):
        if name in named:
            return named[name](message.strip())
    return err


@contextmanager
def named_errors() -> Iterator[None]:
    """Re-raise a CtrakError from a Ray worker as itself (the command line names it)."""
    try:
        yield
    except Exception as err:
        cause = unwrap(err)
        if cause is err or not isinstance(cause, CtrakError):
            raise
        raise type(cause)(*cause.args) from None


def remote_call(fn, *args, num_gpus: float = 0, **kwargs):
    """Run fn(*args, **kwargs) as one Ray task (on a GPU worker when num_gpus) and return its
    value; a CtrakError raised there is raised here as itself."""
    import ray

    task = ray.remote(num_gpus=num_gpus, max_retries=0)(fn)
    with named_errors():
        return ray.get(task.remote(*args, **kwargs))
