"""``task.apply()`` and ``task_always_eager``: run a task in this process, now."""

from __future__ import annotations

import traceback as tb
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .. import states
from .._bridge import portal
from ..exceptions import Ignore, Reject, Retry
from ..task import Context, pop, push

if TYPE_CHECKING:
    from ..result import EagerResult
    from ..task import Task


def apply_eagerly(
    task: Task[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any], options: Mapping[str, Any]
) -> EagerResult:
    """Run ``task`` with a request context; retries run again at once, as in Celery."""
    from ..canvas import signature
    from ..result import EagerResult

    task_id = options.get("task_id") or str(uuid.uuid4())
    retries = int(options.get("retries") or 0)
    throw = options.get("throw")
    if throw is None:
        throw = task.app.conf.task_eager_propagates
    links, errbacks = _as_list(options.get("link")), _as_list(options.get("link_error"))
    while True:
        ctx = Context(
            id=task_id,
            task=task.name,
            args=tuple(args),
            kwargs=dict(kwargs),
            retries=retries,
            is_eager=True,
            root_id=task_id,
            hostname="eager",
            delivery_info={"is_eager": True},
            callbacks=links or None,
            errbacks=errbacks or None,
        )
        token = push(task, ctx)
        try:
            value = task.run(*args, **kwargs)
            if task.is_async:
                value = portal.run(value)
        except Retry as exc:
            retries += 1
            if exc.sig is not None:
                args, kwargs = exc.sig.args, exc.sig.kwargs
            continue
        except (Ignore, Reject) as exc:
            return EagerResult(
                task_id,
                exc,
                states.IGNORED if isinstance(exc, Ignore) else states.REJECTED,
                app=task.app,
                task_name=task.name,
            )
        except Exception as exc:
            if task.autoretry_for and isinstance(exc, task.autoretry_for):
                limit = task.max_retries
                if limit is None or retries < limit:
                    retries += 1
                    continue
            if throw:
                raise
            trace = "".join(tb.format_exception(type(exc), exc, exc.__traceback__))
            for eb in errbacks:
                signature(eb, app=task.app).apply((task_id,))
            return EagerResult(
                task_id, exc, states.FAILURE, trace, app=task.app, task_name=task.name
            )
        finally:
            pop(token)
        for cb in links:
            sig = signature(cb, app=task.app)
            sig.apply(() if sig.immutable else (value,))
        return EagerResult(task_id, value, states.SUCCESS, app=task.app, task_name=task.name)


def _as_list(value: Any) -> list[Any]:
    """``link=`` takes one signature or a list of them, as in Celery."""
    if not value:
        return []
    return [value] if isinstance(value, Mapping) else list(value)
