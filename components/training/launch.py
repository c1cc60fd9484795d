"""Start a function or a module on N local worker processes under torchrun's elastic agent.

``launch(fn, args, nproc=2)`` is what ``torchrun --nproc-per-node 2 --max-restarts 3`` does, from Python:
one host, a c10d rendezvous on a free loopback port, and whole-group restarts when a worker dies (the
workers then resume from their last checkpoint).  Inside a worker that torchrun (or a PyTorchJob) already
started, ``launch`` runs the target in the current process instead of launching again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import runpy
import socket
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .distributed import dist_info_from_env, under_torchrun

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """The worker group failed and the restarts were used up (or it never started)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the agent and the workers it starts; restore them afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _run_in_process(target: Callable[..., Any] | str, args: Sequence[Any]) -> dict[int, Any]:
    """Already a torchrun worker: call the target here, as the worker torchrun would have started."""
    rank = dist_info_from_env().rank
    if callable(target):
        return {rank: target(*args)}
    saved_argv = sys.argv
    sys.argv = [target, *map(str, args)]
    try:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = saved_argv
    return {rank: None}


def launch(
    target: Callable[..., Any] | str,
    args: Sequence[Any] = (),
    nproc: int = 1,
    max_restarts: int = 3,
    *,
    rdzv_timeout: int = 300,
    monitor_interval: float = 0.5,
    threads_per_proc: int | None = None,
    log_dir: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    run_id: str | None = None,
) -> dict[int, Any]:
    """Run ``target`` on ``nproc`` local workers with torchrun's elastic agent; returns ``{rank: result}``.

    ``target`` is a top-level (picklable) function, called as ``target(*args)`` in every worker (its
    return values come back), or a module name run as ``python -m target *args`` (results are None).
    Workers get RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in their environment.
    When a worker fails, the whole group is restarted, up to ``max_restarts`` times; after that
    :class:`LaunchError` is raised.  ``threads_per_proc`` sets OMP_NUM_THREADS for the workers (default:
    1 when nproc > 1 and it is not set, as torchrun does); ``log_dir`` keeps each worker's stdout/stderr
    in files there too; ``env`` adds environment variables for the workers.

    Function targets start with the ``spawn`` method: a script that calls ``launch`` needs the usual
    ``if __name__ == "__main__":`` guard (console scripts such as ``vilbert`` have it).
    """
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if max_restarts < 0:
        raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
    if not callable(target) and not isinstance(target, str):
        raise TypeError(f"target must be a function or a module name, got {type(target).__name__}")
    if under_torchrun():
        log.info("already inside a torchrun worker: running %s in this process", getattr(target, "__name__", target))
        return _run_in_process(target, args)

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    worker_env = dict(env or {})
    # One host: the agent's rendezvous store must not be shared with the workers' process group, or
    # a restarted group cannot reconnect reliably.
    worker_env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    if threads_per_proc is not None:
        worker_env["OMP_NUM_THREADS"] = str(threads_per_proc)
    elif nproc > 1 and "OMP_NUM_THREADS" not in os.environ:
        worker_env["OMP_NUM_THREADS"] = "1"  # N processes x all cores each would oversubscribe the CPU
    logs = (
        DefaultLogsSpecs(log_dir=str(log_dir), redirects=Std.ALL, tee=Std.ALL)
        if log_dir is not None
        else DefaultLogsSpecs()
    )
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=run_id or uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint=f"localhost:{free_port()}",
        rdzv_configs={"join_timeout": rdzv_timeout},
        max_restarts=max_restarts,
        monitor_interval=monitor_interval,
        start_method="spawn",
        local_addr="localhost",
        logs_specs=logs,
    )
    if callable(target):
        entrypoint: Callable[..., Any] | str = target
        call_args: list[Any] = list(args)
    else:
        entrypoint, call_args = sys.executable, ["-u", "-m", target, *map(str, args)]
    try:
        with _environment(worker_env):
            results = elastic_launch(config, entrypoint)(*call_args)
    except ChildFailedError as exc:
        raise LaunchError(f"{nproc}-process run of {getattr(target, '__name__', target)} failed:\n{exc}") from exc
    return dict(results or {})
