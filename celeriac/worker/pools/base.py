"""The pool contract: pools run user code and hand back an ``Outcome``; no broker I/O.

Everything a pool needs to run a task is in ``Job`` (plain, picklable values), and
everything the worker loop must do afterwards is in ``Outcome``: the result document is
already encoded, and follow-up messages are already built, so a prefork parent never
decodes user objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from ...transport.base import Outgoing


@dataclass(slots=True)
class Job:
    task_id: str
    name: str
    body: bytes
    content_type: str
    content_encoding: str
    headers: dict[str, Any]
    delivery_info: dict[str, Any]
    hostname: str
    soft_time_limit: float | None = None
    time_limit: float | None = None
    is_async: bool = False


@dataclass(slots=True)
class ChordJoin:
    """A finished chord-header member: the worker loop counts it and may start the body."""

    group_id: str
    size: int
    body: dict[str, Any]
    failed: bool = False


@dataclass(slots=True)
class Outcome:
    task_id: str
    state: str
    meta: bytes | None = None
    follow_ups: list[Outgoing] = field(default_factory=list)
    chord: ChordJoin | None = None
    retval_repr: str = ""
    exc_repr: str | None = None
    traceback: str | None = None
    runtime: float = 0.0
    requeue: bool | None = None
    worker_pid: int = 0
    ack: bool = True
    extra_results: list[tuple[str, bytes]] = field(default_factory=list)


class Runner(Protocol):
    """What a pool calls: provided by ``worker.trace``."""

    def execute(self, job: Job) -> Outcome:
        """Run the task in the calling thread (sync or async task)."""

    async def aexecute(self, job: Job) -> Outcome:
        """Run the task on the running loop; async tasks run natively here."""

    def lost(self, job: Job, exc: BaseException) -> Outcome:
        """The outcome for a job whose process died or hit its hard time limit."""


class Pool(Protocol):
    kind: ClassVar[str]

    async def start(self) -> None: ...

    async def run(self, job: Job) -> Outcome: ...

    def grow(self, n: int = 1) -> None: ...

    def shrink(self, n: int = 1) -> None: ...

    @property
    def size(self) -> int: ...

    def terminate(self, task_id: str, signum: int) -> bool: ...

    async def stop(self, *, graceful: bool) -> None: ...

    def pids(self) -> list[int]: ...
