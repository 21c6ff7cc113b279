"""The backend used when no ``result_backend`` is set: writes vanish, reads explain why.

Storing is a silent no-op so tasks still run and ack; anything that needs a stored
result (reading, waiting, groups, chords) raises ``NotSupported`` naming the setting
to change, as Celery's ``DisabledBackend`` does.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from typing import NoReturn

from ..exceptions import NotSupported
from .base import ResultBackend, ResultMeta

__all__ = ["DisabledBackend"]

HINT = (
    "No result backend is configured. Set result_backend (e.g. 'sqlite://' or "
    "'redis://...') to store and read task results."
)


def _refuse(what: str) -> NoReturn:
    raise NotSupported(f"Cannot {what}: {HINT}")


class DisabledBackend(ResultBackend):
    """Keeps nothing, so results cannot be read back (scheme ``disabled://``)."""

    persistent = False

    async def connect(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def store(
        self, meta: ResultMeta, *, ttl: float | None, reply_to: str | None = None
    ) -> None:
        return None

    async def store_raw(
        self, task_id: str, data: bytes, *, ttl: float | None, reply_to: str | None = None
    ) -> None:
        return None

    async def get(self, task_id: str) -> ResultMeta | None:
        _refuse(f"read the result of task {task_id}")

    async def get_many(self, task_ids: Sequence[str]) -> dict[str, ResultMeta]:
        _refuse(f"read the results of {len(task_ids)} task(s)")

    def wait(
        self, task_ids: Sequence[str], *, timeout: float | None
    ) -> AsyncGenerator[ResultMeta, None]:
        # Raised on the call, not on first iteration, so the error points at the caller.
        _refuse(f"wait for the result of task(s) {', '.join(task_ids[:3])}")

    async def forget(self, task_id: str) -> None:
        return None  # nothing was kept

    async def save_group(
        self, group_id: str, task_ids: Sequence[str], *, ttl: float | None
    ) -> None:
        _refuse(f"save group {group_id}")

    async def load_group(self, group_id: str) -> list[str] | None:
        _refuse(f"load group {group_id}")

    async def forget_group(self, group_id: str) -> None:
        return None

    async def chord_join(
        self, group_id: str, task_id: str, size: int, *, ttl: float | None = None
    ) -> bool:
        _refuse(f"run chord {group_id} (a chord counts finished header tasks in the backend)")
