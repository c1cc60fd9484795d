"""A lock held in the registry itself, so that reading and moving a model's aliases is one step for every process.

The lock of model ``M`` is a registered model named ``M.lock``: creating a registered model whose name exists
fails in every MLflow store (the name is the primary key), so exactly one process at a time creates it -- with the
sqlite file, with PostgreSQL, and through an ``mlflow server`` with any number of workers.  The holder deletes it
when done.  Its tags say who holds it and until when (``lock.owner``, ``lock.expires``, a Unix time): a holder
that crashed leaves a lock that the next process breaks once it has expired (``ttl_s`` after it was taken; a gate
decision takes well under a second, so the default of 120 s only matters after a crash).

``vilbert register`` (the gate), ``vilbert promote``, ``vilbert rollback`` and the registry-event listener all take
it before they read aliases they are about to change.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

LOCK_SUFFIX = ".lock"
OWNER_TAG, EXPIRES_TAG = "lock.owner", "lock.expires"


class RegistryLockTimeout(TimeoutError):
    """The lock was held by someone else for longer than the caller would wait."""


def lock_name(name: str) -> str:
    """The registered model that is the lock of ``name``."""
    return f"{name}{LOCK_SUFFIX}"


def is_lock(name: str) -> bool:
    return name.endswith(LOCK_SUFFIX)


@contextmanager
def registry_lock(client: Any, name: str, timeout_s: float = 60.0, ttl_s: float = 120.0) -> Iterator[str]:
    """Hold the lock of registered model ``name`` for the ``with`` block; yields the owner string."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    target = lock_name(name)
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        tags = {OWNER_TAG: owner, EXPIRES_TAG: f"{time.time() + ttl_s:.3f}"}
        try:
            client.create_registered_model(target, tags=tags, description=f"lock of {name}, held by {owner} "
                                           "(vilbert); delete it only if that process is gone")  # fmt: skip
            break
        except MlflowException as exc:
            if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
        _break_if_expired(client, target)
        if time.monotonic() > deadline:
            raise RegistryLockTimeout(f"{target} is held by {_holder(client, target)} for more than {timeout_s:g} s")
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 1.5, 0.5)
    try:
        yield owner
    finally:
        _release(client, target, owner)


def _holder(client: Any, target: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(target).tags.get(OWNER_TAG, "unknown")
    except MlflowException:
        return "nobody (released)"


def _break_if_expired(client: Any, target: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(target).tags
    except MlflowException:
        return  # released meanwhile
    try:
        expired = float(tags.get(EXPIRES_TAG, "0")) < time.time()
    except ValueError:
        expired = True
    if expired:
        with contextlib.suppress(MlflowException):  # someone else broke it first
            client.delete_registered_model(target)


def _release(client: Any, target: str, owner: str) -> None:
    """Delete the lock if it is still ours (it may have been broken after expiring)."""
    from mlflow.exceptions import MlflowException

    try:
        if client.get_registered_model(target).tags.get(OWNER_TAG) == owner:
            client.delete_registered_model(target)
    except MlflowException:
        pass
