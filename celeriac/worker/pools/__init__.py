"""Pool kinds by name (``--pool``/``worker_pool``) and the factory the worker calls."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable

from ...exceptions import ImproperlyConfigured
from .asyncio import AsyncioPool
from .base import Job, Outcome, Pool, Runner
from .prefork import PreforkPool
from .solo import SoloPool
from .threads import ThreadPool

__all__ = [
    "POOLS",
    "AsyncioPool",
    "Job",
    "Outcome",
    "Pool",
    "PreforkPool",
    "Runner",
    "SoloPool",
    "ThreadPool",
    "create_pool",
]

logger = logging.getLogger(__name__)

PoolFactory = Callable[..., Pool]


def _unsupported(kind: str) -> PoolFactory:
    def factory(*args: object, **kwargs: object) -> Pool:
        raise ImproperlyConfigured(
            f"The {kind} pool is not supported by celeriac: write the task as `async def` "
            "and use --pool=asyncio, or use --pool=threads for blocking I/O."
        )

    return factory


POOLS: dict[str, PoolFactory] = {
    "prefork": PreforkPool,
    "processes": PreforkPool,  # Celery's alias
    "threads": ThreadPool,
    "asyncio": AsyncioPool,
    "solo": SoloPool,
    "eventlet": _unsupported("eventlet"),
    "gevent": _unsupported("gevent"),
}


def create_pool(
    kind: str,
    runner: Runner,
    concurrency: int,
    *,
    max_tasks_per_child: int | None = None,
    max_memory_per_child: int | None = None,
) -> Pool:
    """Build the pool named ``kind``; per-child limits only mean something for prefork."""
    factory = POOLS.get(kind)
    if factory is None:
        close = difflib.get_close_matches(kind, POOLS, n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ImproperlyConfigured(
            f"Unknown pool {kind!r}: choose one of {', '.join(sorted(POOLS))}.{hint}"
        )
    if factory is PreforkPool:
        return PreforkPool(
            runner,
            concurrency,
            max_tasks_per_child=max_tasks_per_child,
            max_memory_per_child=max_memory_per_child,
        )
    if max_tasks_per_child or max_memory_per_child:
        logger.debug("max_tasks/memory_per_child only apply to the prefork pool; ignored")
    return factory(runner, concurrency)
