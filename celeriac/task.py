"""Task: the callable users decorate, plus the request context a running task sees."""

from __future__ import annotations

import contextvars
import datetime as dt
import inspect
import random
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, ParamSpec, TypeVar

from . import states
from .exceptions import MaxRetriesExceededError, Retry

if TYPE_CHECKING:
    from .app import Celery
    from .canvas import Signature
    from .result import AsyncResult, EagerResult

P = ParamSpec("P")
R = TypeVar("R")


class Context:
    """``task.request``: what the worker knows about the running call."""

    id: str | None = None
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = {}
    retries: int = 0
    hostname: str | None = None
    delivery_info: Mapping[str, Any] = {}
    root_id: str | None = None
    parent_id: str | None = None
    group: str | None = None
    group_index: int | None = None
    eta: str | None = None
    expires: str | None = None
    is_eager: bool = False
    callbacks: Any = None
    errbacks: Any = None
    chain: Any = None
    chord: Any = None
    correlation_id: str | None = None
    reply_to: str | None = None
    origin: str | None = None
    timelimit: Sequence[Any] = (None, None)
    ignore_result: bool = False
    headers: Mapping[str, Any] | None = None
    task: str | None = None
    priority: int | None = None

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        return f"<Context: {self.__dict__!r}>"


_EMPTY = Context()
_current: contextvars.ContextVar[tuple[Task[..., Any], Context] | None] = contextvars.ContextVar(
    "celeriac_current_task", default=None
)


def current() -> tuple[Task[..., Any], Context] | None:
    return _current.get()


def push(task: Task[..., Any], request: Context) -> contextvars.Token[Any]:
    return _current.set((task, request))


def pop(token: contextvars.Token[Any]) -> None:
    _current.reset(token)


class Task(Generic[P, R]):
    """One registered task. Attributes are Celery's task options and defaults."""

    name: str = ""
    app: Celery
    typing: bool = True
    max_retries: int | None = 3
    default_retry_delay: float = 180
    rate_limit: str | float | None = None
    ignore_result: bool | None = None
    store_errors_even_if_ignored: bool = False
    time_limit: float | None = None
    soft_time_limit: float | None = None
    acks_late: bool | None = None
    acks_on_failure_or_timeout: bool | None = None
    reject_on_worker_lost: bool | None = None
    track_started: bool | None = None
    serializer: str | None = None
    compression: str | None = None
    queue: str | None = None
    routing_key: str | None = None
    exchange: str | None = None
    priority: int | None = None
    expires: float | dt.datetime | None = None
    autoretry_for: tuple[type[BaseException], ...] = ()
    dont_autoretry_for: tuple[type[BaseException], ...] = ()
    retry_kwargs: Mapping[str, Any] = {}
    retry_backoff: bool | float = False
    retry_backoff_max: float = 600
    retry_jitter: bool = True
    throws: tuple[type[BaseException], ...] = ()
    bind: bool = False
    shadow: str | None = None
    abstract: ClassVar[bool] = True
    _fun: Callable[..., Any] | None = None
    _sig: inspect.Signature | None = None

    def __init__(self) -> None:
        pass

    # -- calling ----------------------------------------------------------

    def run(self, *args: Any, **kwargs: Any) -> Any:
        if self._fun is None:
            raise NotImplementedError(f"task {self.name!r} has no body: override run()")
        if self.bind:
            return self._fun(self, *args, **kwargs)
        return self._fun(*args, **kwargs)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the task body in this process, as a plain function call."""
        result: R = self.run(*args, **kwargs)
        return result

    @property
    def is_async(self) -> bool:
        fun = self._fun if self._fun is not None else type(self).run
        return inspect.iscoroutinefunction(fun)

    @property
    def request(self) -> Context:
        cur = _current.get()
        if cur is not None and cur[0].name == self.name:
            return cur[1]
        return _EMPTY

    @property
    def __wrapped__(self) -> Callable[..., Any] | None:
        return self._fun

    def check_arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Raise TypeError now, at send time, for a call the task cannot accept."""
        if not self.typing:
            return
        sig = self._sig
        if sig is None:
            fun = self._fun if self._fun is not None else self.run
            try:
                sig = inspect.signature(fun)
            except (TypeError, ValueError):
                return
            if self.bind and self._fun is not None:
                params = list(sig.parameters.values())[1:]
                sig = sig.replace(parameters=params)
            self._sig = sig
        try:
            sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.name}{sig}: {exc}") from None

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult:
        return self.apply_async(args, kwargs)

    async def adelay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult:
        return await self.aapply_async(args, kwargs)

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        args, kwargs = tuple(args or ()), dict(kwargs or {})
        self.check_arguments(args, kwargs)
        if self.app.conf.task_always_eager:
            return self.apply(args, kwargs, **options)
        result: AsyncResult = self.app.send_task(self.name, args, kwargs, _task=self, **options)
        return result

    async def aapply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> AsyncResult:
        args, kwargs = tuple(args or ()), dict(kwargs or {})
        self.check_arguments(args, kwargs)
        if self.app.conf.task_always_eager:
            return self.apply(args, kwargs, **options)
        sent: AsyncResult = await self.app.asend_task(
            self.name, args, kwargs, _task=self, **options
        )
        return sent

    def apply(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> EagerResult:
        """Run the task here and now, as ``task_always_eager`` does, with retries inline."""
        from .worker.eager import apply_eagerly

        return apply_eagerly(self, tuple(args or ()), dict(kwargs or {}), options)

    # -- signatures ---------------------------------------------------------

    def signature(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *starargs: Any,
        **options: Any,
    ) -> Signature:
        from .canvas import Signature

        return Signature(self, args, kwargs, options, app=self.app)

    subtask = signature

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        return self.signature(args, kwargs)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        sig = self.signature(args, kwargs)
        sig.immutable = True
        return sig

    def map(self, it: Iterable[Any]) -> Signature:
        from .canvas import xmap

        return xmap(self.s(), it, app=self.app)

    def starmap(self, it: Iterable[Any]) -> Signature:
        from .canvas import xstarmap

        return xstarmap(self.s(), it, app=self.app)

    def chunks(self, it: Iterable[Any], n: int) -> Signature:
        from .canvas import chunks

        return chunks(self.s(), it, n, app=self.app)

    def AsyncResult(self, task_id: str, **kwargs: Any) -> AsyncResult:
        from .result import AsyncResult

        return AsyncResult(task_id, app=self.app, task_name=self.name, **kwargs)

    # -- inside a running task ------------------------------------------------

    def retry(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: dt.datetime | None = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **options: Any,
    ) -> Retry:
        """Schedule this call again; raises :class:`Retry` for the worker to see."""
        req = self.request
        if req.id is None:
            raise RuntimeError(f"{self.name}.retry() called outside of a running task")
        limit = self.max_retries if max_retries is None else max_retries
        if limit is not None and req.retries >= limit:
            if exc is not None:
                raise exc
            raise MaxRetriesExceededError(
                f"Can't retry {self.name}[{req.id}] args:{req.args} kwargs:{req.kwargs}",
                task_args=req.args,
                task_kwargs=req.kwargs,
            )
        if eta is None and countdown is None:
            countdown = self.default_retry_delay
        when: Any = eta if eta is not None else countdown
        retry_opts = dict(options)
        if eta is not None:
            retry_opts["eta"] = eta
        else:
            retry_opts["countdown"] = countdown
        sig = self.signature(
            req.args if args is None else args,
            req.kwargs if kwargs is None else kwargs,
            task_id=req.id,
            retries=req.retries + 1,
            root_id=req.root_id,
            parent_id=req.parent_id,
            group_id=req.group,
            group_index=req.group_index,
            chord=req.chord,
            link=req.callbacks,
            link_error=req.errbacks,
            chain=req.chain,
            **retry_opts,
        )
        if req.delivery_info and not options.get("queue"):
            rk = req.delivery_info.get("routing_key")
            if rk and not req.delivery_info.get("exchange"):
                sig.options["queue"] = rk
        err = Retry(exc=exc, when=when, is_eager=req.is_eager, sig=sig)
        if throw:
            raise err
        return err

    def backoff_delay(self, retries: int) -> float:
        """Celery's exponential backoff: factor * 2**retries, capped, maybe jittered."""
        factor = 1.0 if self.retry_backoff is True else float(self.retry_backoff)
        delay = min(factor * float(2**retries), float(self.retry_backoff_max))
        if self.retry_jitter:
            delay = float(random.randrange(int(delay) + 1))
        return delay

    def update_state(
        self, task_id: str | None = None, state: str | None = None, meta: Any = None, **kw: Any
    ) -> None:
        """Store a custom state (e.g. PROGRESS) for ``task_id`` or the running task."""
        from .backends.base import ResultMeta

        tid = task_id or self.request.id
        if tid is None:
            raise RuntimeError("update_state() needs a task_id outside a running task")
        record = ResultMeta(task_id=tid, status=state or states.PENDING, result=meta)
        self.app.portal.run(self.app.astore_result(record))

    def __repr__(self) -> str:
        return f"<@task: {self.name} of {self.app.main or '__main__'}>"


def new_task_id() -> str:
    return str(uuid.uuid4())
