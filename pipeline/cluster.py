"""Joining or starting a Ray cluster, Ray Data settings, and errors back from workers.

- `ray_session(config)`: reuse a Ray this process already joined (a test session's, or a
  caller's); else `ray.init(address)` - `address` empty means RAY_ADDRESS when set (inside
  `ray job submit`), otherwise a new local cluster (never a stray one found on the machine) -
  and shut it down afterwards;
- `configure_data(progress)`: the Ray Data settings every job uses (progress bars in a
  terminal only; no silently skipped blocks: a failed block fails the job, whose finished
  shards are kept); `quiet_local_cluster()`: no messages the user can do nothing about
  (`ctrak --verbose` brings them back);
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
    noise = quiet_local_cluster() if address == "local" else None
    try:
        ray.init(
            address=address,
            runtime_env=_runtime_env(config.runtime_env),
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
        log.info(
            "ray: %s", "started a local cluster" if address == "local" else "joined " + address
        )
        configure_data(config.progress)
        yield
    finally:
        ray.shutdown()
        if noise is not None:
            noise.close()


def verbose() -> bool:
    """`ctrak --verbose` (CTRAK_VERBOSE=1): let every library message through."""
    return os.environ.get("CTRAK_VERBOSE", "") == "1"


# Ray Data passes an object reference to every pool actor's constructor, so the driver's
# core worker logs this at error level for each actor pool although nothing failed
# (ray-project/ray#57733; the restart caveat it names is ray-project/ray#53727).
KNOWN_NOISE = re.compile(
    rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object "
    rb"store and max_restarts > 0"
)


class _StderrFilter:
    """Drop KNOWN_NOISE lines from this process's stderr (file descriptor 2, where Ray's C++
    core worker writes); everything else passes through unchanged, at once."""

    def __init__(self) -> None:
        import threading

        self.saved = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self.thread = threading.Thread(target=self._pump, args=(read_end,), daemon=True)
        self.thread.start()

    def _pump(self, read_end: int) -> None:
        pending = b""
        while chunk := os.read(read_end, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            out = b"".join(line + b"\n" for line in lines if not KNOWN_NOISE.search(line))
            if pending and not pending.startswith(b"["):  # not a C++ log line: no wait
                out, pending = out + pending, b""
            if out:
                os.write(self.saved, out)
        if pending:
            os.write(self.saved, pending)
        os.close(read_end)

    def close(self) -> None:
        import sys

        sys.stderr.flush()
        os.dup2(self.saved, 2)  # the pipe's last writer closes: the pump drains and ends
        self.thread.join(timeout=5)
        os.close(self.saved)


def quiet_local_cluster() -> _StderrFilter | None:
    """Before starting a local cluster: keep messages the user can do nothing about out of
    the job's output, without weakening anything. Token auth stays as Ray chooses it (on for
    a new local cluster); only its announcement is not shown. The core worker's
    KNOWN_NOISE line is dropped from stderr until the filter is closed; every other line,
    errors included, passes. `--verbose` (CTRAK_VERBOSE=1) keeps Ray's defaults."""
    if verbose():
        return None
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR
    )
    return _StderrFilter()


def progress_bars(progress: bool) -> bool:
    """Bars only in a terminal; elsewhere (logs, CI) the job prints a line per shard."""
    import sys

    return progress and sys.stdout.isatty()


def configure_data(progress: bool) -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = progress_bars(progress)
    if not verbose():  # Ray Data's "execution finished in N seconds" per dataset
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    if not ctx.enable_progress_bars and not verbose():
        # without bars Ray Data announces that they are off, or logs a progress block every
        # few seconds between the job's own lines: the job reports per shard instead
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
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
        # a RayTaskError(NamedError) is an instance of both: its `cause` is the plain one
        if isinstance(node, CtrakError) and not type(node).__module__.startswith("ray."):
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
