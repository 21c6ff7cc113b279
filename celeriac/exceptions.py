"""Every public error celeriac raises, named as Celery names them."""

from __future__ import annotations

import builtins
from typing import Any


class CeleriacError(Exception):
    """Base of celeriac's own errors."""


class ImproperlyConfigured(CeleriacError, ValueError):
    """A setting, URL or option is wrong; the message names it and the fix."""


class NotRegistered(CeleriacError, KeyError):
    """A task name that no app registered."""

    def __str__(self) -> str:
        return f"Task of kind {self.args[0]!r} never registered, please make sure it's imported."


class QueueNotFound(CeleriacError, KeyError):
    """task_create_missing_queues is off and a route names an unknown queue."""


class TimeoutError(CeleriacError, builtins.TimeoutError):
    """A result did not become ready within the timeout."""


class TaskError(CeleriacError):
    """A task-related error."""


class InvalidTaskError(TaskError):
    """A message that is not a valid task message."""


class ContentDisallowed(CeleriacError):
    """A message whose content type is not in accept_content."""


class DecodeError(CeleriacError):
    """A message body that cannot be decoded."""


class ChordError(TaskError):
    """A chord header member failed, so the body cannot run."""


class NotSupported(CeleriacError):
    """The chosen broker or backend cannot do what was asked."""


class Retry(TaskError):
    """Raised by ``Task.retry`` to tell the worker the task is being retried."""

    def __init__(
        self,
        message: str | None = None,
        exc: BaseException | str | None = None,
        when: float | Any = None,
        is_eager: bool = False,
        sig: Any = None,
    ) -> None:
        self.message = message
        self.exc = exc
        self.when = when
        self.is_eager = is_eager
        self.sig = sig
        super().__init__(message, exc, when)

    def humanize(self) -> str:
        if isinstance(self.when, int | float):
            return f"in {self.when}s"
        return f"at {self.when}"

    def __str__(self) -> str:
        if self.message:
            return self.message
        if self.exc:
            return f"Retry {self.humanize()}: {self.exc!r}"
        return f"Retry {self.humanize()}"

    def __reduce__(self) -> Any:
        return type(self), (self.message, self.exc, self.when)


RetryTaskError = Retry


class Ignore(TaskError):
    """Raised by a task so the worker records nothing for it."""


class Reject(TaskError):
    """Raised by a task to reject (and maybe requeue) its message."""

    def __init__(self, reason: Any = None, requeue: bool = False) -> None:
        self.reason = reason
        self.requeue = requeue
        super().__init__(reason, requeue)

    def __repr__(self) -> str:
        return f"reject requeue={self.requeue}: {self.reason}"


class MaxRetriesExceededError(TaskError):
    """``Task.retry`` was called more than ``max_retries`` times."""

    def __init__(self, *args: Any, task_args: Any = None, task_kwargs: Any = None) -> None:
        self.task_args = task_args
        self.task_kwargs = task_kwargs
        super().__init__(*args)


class TaskRevokedError(TaskError):
    """The task was revoked, so it has no result."""


class WorkerLostError(CeleriacError):
    """The process running the task exited before it finished."""


class Terminated(CeleriacError):
    """The task was terminated by a signal."""


class SoftTimeLimitExceeded(CeleriacError):
    """Raised inside a task when its soft time limit passes, so it can clean up."""

    def __str__(self) -> str:
        return "SoftTimeLimitExceeded" + (f"{self.args}" if self.args else "()")


class TimeLimitExceeded(CeleriacError):
    """The hard time limit passed and the process running the task was killed."""

    def __str__(self) -> str:
        return f"TimeLimitExceeded{self.args}"


class TransportError(CeleriacError):
    """The broker failed or cannot be reached."""


class BackendError(CeleriacError):
    """The result backend failed or cannot be reached."""
