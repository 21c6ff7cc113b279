"""Signatures and workflows: chain, group, chord, map, starmap, chunks.

A signature is a dict (Celery's JSON form), so any workflow can be built in one process,
serialised and run from another. Composite types keep their children in ``kwargs``.
Workflows run without coordinator tasks: a chain travels in the message's ``chain``
field, a chord body in each header message's ``chord`` field, and the chord join is
counted in the result backend by task id (see ``ResultBackend.chord_join``).
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from .protocol import saferepr

if TYPE_CHECKING:
    from .app import Celery
    from .result import AsyncResult, GroupResult
    from .task import Task

_SUBTYPES: dict[str, type[Signature]] = {}


def _register(name: str) -> Any:
    def deco(cls: type[Signature]) -> type[Signature]:
        _SUBTYPES[name] = cls
        return cls

    return deco


def _app(app: Celery | None) -> Celery:
    if app is not None:
        return app
    from .app import current_app

    return current_app()


class Signature(dict[str, Any]):
    """One task call, frozen as data: name, args, kwargs and options."""

    _app_ref: Celery | None = None
    _type: Task[..., Any] | None = None

    def __init__(
        self,
        task: str | Mapping[str, Any] | Task[..., Any] | None = None,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        type: Task[..., Any] | None = None,
        subtask_type: str | None = None,
        immutable: bool = False,
        app: Celery | None = None,
        **ex: Any,
    ) -> None:
        from .task import Task as _Task

        if isinstance(task, Mapping):
            super().__init__(task)
            return
        if isinstance(task, _Task):
            type, task = task, task.name
            app = app or type.app
        self._app_ref = app
        self._type = type or ex.pop("task_obj", None)
        super().__init__(
            task=task,
            args=tuple(args or ()),
            kwargs=dict(kwargs or {}),
            options={**(options or {}), **ex},
            subtask_type=subtask_type,
            immutable=immutable,
        )

    # -- dict-backed attributes --------------------------------------------

    @property
    def task(self) -> str:
        return str(self["task"])

    @property
    def name(self) -> str:
        return str(self["task"])

    @property
    def args(self) -> tuple[Any, ...]:
        return tuple(self.get("args") or ())

    @args.setter
    def args(self, value: Sequence[Any]) -> None:
        self["args"] = tuple(value)

    @property
    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = self.setdefault("kwargs", {})
        return kw

    @kwargs.setter
    def kwargs(self, value: Mapping[str, Any]) -> None:
        self["kwargs"] = dict(value)

    @property
    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = self.setdefault("options", {})
        return opts

    @property
    def subtask_type(self) -> str | None:
        return self.get("subtask_type")

    @property
    def immutable(self) -> bool:
        return bool(self.get("immutable"))

    @immutable.setter
    def immutable(self, value: bool) -> None:
        self["immutable"] = bool(value)

    @property
    def id(self) -> str | None:
        return self.options.get("task_id")

    @property
    def app(self) -> Celery:
        if self._app_ref is None and self._type is not None:
            self._app_ref = self._type.app
        return _app(self._app_ref)

    @app.setter
    def app(self, value: Celery) -> None:
        self._app_ref = value

    @property
    def type(self) -> Task[..., Any]:
        if self._type is None:
            self._type = self.app.tasks[self.task]
        return self._type

    # -- building ---------------------------------------------------------------

    def _merge(
        self,
        args: Sequence[Any] | None,
        kwargs: Mapping[str, Any] | None,
        options: Mapping[str, Any],
    ) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]:
        opts = {**self.options, **{k: v for k, v in options.items() if v is not None}}
        if self.immutable:
            return self.args, dict(self.kwargs), opts
        return (
            tuple(args or ()) + self.args,
            {**self.kwargs, **(kwargs or {})},
            opts,
        )

    def clone(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **opts: Any,
    ) -> Signature:
        a, kw, o = self._merge(args, kwargs, opts)
        sig = type(self).from_dict(
            {**self, "args": a, "kwargs": kw, "options": o}, app=self._app_ref
        )
        sig._type = self._type
        return sig

    partial = clone

    def set(self, immutable: bool | None = None, **options: Any) -> Signature:
        if immutable is not None:
            self.immutable = immutable
        self.options.update(options)
        return self

    def set_immutable(self, immutable: bool) -> None:
        self.immutable = immutable

    def link(self, callback: Signature | Mapping[str, Any]) -> Signature:
        self.options.setdefault("link", []).append(signature(callback))
        return signature(callback)

    def link_error(self, errback: Signature | Mapping[str, Any]) -> Signature:
        self.options.setdefault("link_error", []).append(signature(errback))
        return signature(errback)

    on_error = link_error

    def freeze(self, _id: str | None = None, group_id: str | None = None, **kw: Any) -> Any:
        """Fix this call's task id now, so results can be referenced before sending."""
        opts = self.options
        if _id is not None:
            opts["task_id"] = _id
        opts.setdefault("task_id", str(uuid.uuid4()))
        if group_id is not None:
            opts["group_id"] = group_id
        return self.AsyncResult(opts["task_id"])

    def AsyncResult(self, task_id: str) -> AsyncResult:
        from .result import AsyncResult

        return AsyncResult(task_id, app=self.app, task_name=self.task)

    # -- running ----------------------------------------------------------------

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        a, kw, opts, task = self._call_args(args, kwargs, options)
        if task is not None and self.app.conf.task_always_eager:
            return task.apply(a, kw, **opts)
        return self.app.send_task(self.task, a, kw, _task=task, **opts)

    async def aapply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        a, kw, opts, task = self._call_args(args, kwargs, options)
        if task is not None and self.app.conf.task_always_eager:
            return task.apply(a, kw, **opts)
        return await self.app.asend_task(self.task, a, kw, _task=task, **opts)

    def _call_args(
        self, args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None, options: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, Any], Task[..., Any] | None]:
        """Merge a partial call and check it against the task, as ``Task.apply_async`` does."""
        a, kw, opts = self._merge(args, kwargs, options)
        task = self._type if self._type is not None else self.app.tasks.get(self.task)
        if task is not None:
            task.check_arguments(a, kw)
        return a, kw, opts, task

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async(args, kwargs)

    async def adelay(self, *args: Any, **kwargs: Any) -> Any:
        return await self.aapply_async(args, kwargs)

    def apply(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        a, kw, opts = self._merge(args, kwargs, options)
        return self.type.apply(a, kw, **opts)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the task body here (as Celery does for a single signature)."""
        a, kw, _ = self._merge(args, kwargs, {})
        return self.type(*a, **kw)

    # -- composing ---------------------------------------------------------------

    def __or__(self, other: Any) -> Signature:  # type: ignore[override]
        if isinstance(other, Signature):
            return chain(self, other, app=self._app_ref)
        return NotImplemented

    def __deepcopy__(self, memo: Any) -> Signature:
        return self.clone()

    def __json__(self) -> dict[str, Any]:
        return dict(self)

    def __reduce__(self) -> Any:
        return signature, (dict(self),)

    def __repr__(self) -> str:
        args = ", ".join(
            [saferepr(a) for a in self.args]
            + [f"{k}={saferepr(v)}" for k, v in self.kwargs.items()]
        )
        return f"{self.task}({args}){'!' if self.immutable else ''}"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], app: Celery | None = None) -> Signature:
        sub = d.get("subtask_type")
        target = _SUBTYPES.get(sub) if sub else None
        if target is not None and cls is Signature:
            return target.from_dict(d, app=app)
        sig = Signature.__new__(cls)
        dict.__init__(sig, d)
        sig._app_ref = app
        sig._type = None
        sig["args"] = tuple(d.get("args") or ())
        sig["kwargs"] = dict(d.get("kwargs") or {})
        sig["options"] = dict(d.get("options") or {})
        sig.setdefault("subtask_type", None)
        sig.setdefault("immutable", False)
        return sig


def signature(varies: Any, *args: Any, **kwargs: Any) -> Signature:
    """Build a signature from a name, a Task, a dict (its JSON form) or a signature."""
    app = kwargs.pop("app", None)
    if isinstance(varies, Signature):
        if app is not None:
            varies._app_ref = app
        return varies
    if isinstance(varies, Mapping):
        return Signature.from_dict(varies, app=app)
    return Signature(varies, *args, app=app, **kwargs)  # type: ignore[misc]


subtask = maybe_signature = signature


def _sigs(tasks: Iterable[Any], app: Celery | None) -> list[Signature]:
    return [signature(t, app=app) for t in tasks]


def _app_of(sigs: Iterable[Any]) -> Celery | None:
    """A workflow built without ``app=`` runs on its tasks' app (as in Celery), not on
    whichever app happens to be current."""
    for s in sigs:
        if isinstance(s, Signature):
            found = s._app_ref or (s._type.app if s._type is not None else None)
            if found is not None:
                return found
    return None


# -- chain ----------------------------------------------------------------------


class _TaskList(Signature):
    """chain and group: children kept in ``kwargs['tasks']``; calling sends the workflow."""

    _kind = ""

    def __init__(self, *tasks: Any, app: Celery | None = None, **options: Any) -> None:
        if len(tasks) == 1 and not isinstance(tasks[0], Mapping) and isinstance(tasks[0], Iterable):
            tasks = tuple(tasks[0])
        app = app or _app_of(tasks)
        children = self._flatten(_sigs(tasks, app))
        super().__init__(
            f"celery.{self._kind}",
            (),
            {"tasks": children},
            options,
            subtask_type=self._kind,
            app=app,
        )

    @staticmethod
    def _flatten(tasks: list[Signature]) -> list[Signature]:
        return tasks

    @property
    def tasks(self) -> list[Signature]:
        tasks = [signature(t, app=self._app_ref) for t in self.kwargs.get("tasks", [])]
        self.kwargs["tasks"] = tasks
        return tasks

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], app: Celery | None = None) -> Signature:
        tasks = [signature(t, app=app) for t in (d.get("kwargs") or {}).get("tasks", [])]
        sig = cls(*tasks, app=app, **dict(d.get("options") or {}))
        sig.immutable = bool(d.get("immutable"))
        if d.get("args"):
            sig.args = tuple(d["args"])
        return sig

    def clone(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **opts: Any,
    ) -> Signature:
        merged = {**self.options, **opts}
        sig = type(self)(*[t.clone() for t in self.tasks], app=self._app_ref, **merged)
        if args:
            sig.args = tuple(args) + self.args
        return sig

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async(args, kwargs)


@_register("chain")
class chain(_TaskList):
    """Run tasks one after another, each result prepended to the next one's args."""

    _kind = "chain"

    @staticmethod
    def _flatten(tasks: list[Signature]) -> list[Signature]:
        flat: list[Signature] = []
        for t in tasks:
            if isinstance(t, chain) and not t.options:
                flat.extend(t.tasks)
            else:
                flat.append(t)
        return flat

    def __or__(self, other: Any) -> Signature:  # type: ignore[override]
        if isinstance(other, Signature):
            return chain(*self.tasks, other, app=self._app_ref, **self.options)
        return NotImplemented

    def _steps(self) -> list[Signature]:
        """Normalise: a group followed by a task becomes a chord (as in Celery)."""
        steps: list[Signature] = []
        for t in self.tasks:
            t = t.clone()
            prev = steps[-1] if steps else None
            if isinstance(prev, group) and not isinstance(t, group):
                steps[-1] = chord(prev.tasks, t, app=self._app_ref, **prev.options)
            elif isinstance(prev, chord) and not isinstance(t, group):
                prev.kwargs["body"] = chain(prev.body, t, app=self._app_ref)
            else:
                steps.append(t)
        return steps

    def freeze_steps(self) -> tuple[list[Signature], list[AsyncResult | GroupResult]]:
        steps = self._steps()
        results: list[Any] = []
        parent: Any = None
        for step in steps:
            res = step.freeze()
            if parent is not None:
                node = res  # a chord's result already has its group as parent: go above it
                while node.parent is not None:
                    node = node.parent
                node.parent = parent
            results.append(res)
            parent = res
        return steps, results

    def freeze(self, _id: str | None = None, group_id: str | None = None, **kw: Any) -> Any:
        # Ids land on this chain's own steps, so freezing again or sending reuses them.
        tasks = self.tasks
        for i, t in enumerate(tasks):
            t.freeze(_id if i == len(tasks) - 1 else None)
        _, results = self.freeze_steps()
        return results[-1]

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        if not self.tasks:
            raise ValueError("cannot apply an empty chain")
        if self.app.conf.task_always_eager:
            return self.apply(args, kwargs, **options)
        steps, results = self.freeze_steps()
        first, rest = steps[0], steps[1:]
        # As in Celery: callbacks go on the last step, errbacks on every step, so the
        # step that fails (and stops the chain) is the one that calls them.
        for key, targets in (("link", steps[-1:]), ("link_error", steps)):
            extra_sigs = options.pop(key, None)
            if isinstance(extra_sigs, Mapping):
                extra_sigs = [extra_sigs]
            found = [*self.options.get(key, ()), *(extra_sigs or ())]
            for step in targets if found else ():
                step.options.setdefault(key, []).extend(found)
        extra = {
            k: v
            for k, v in {**self.options, **options}.items()
            if k not in ("link", "link_error", "task_id")
        }
        a = tuple(args or ()) + self.args
        if rest:
            extra["chain"] = [dict(s) for s in reversed(rest)]
        first.apply_async(a, kwargs, **extra)
        return results[-1]

    def apply(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        res: Any = None
        last: Any = None
        for i, step in enumerate(self._steps()):
            if i == 0:
                res = step.apply(tuple(args or ()) + self.args, kwargs, **options)
            else:
                res = step.apply((last,) if not step.immutable else ())
            last = res.get()
        return res

    def __repr__(self) -> str:
        return " | ".join(repr(t) for t in self.tasks) if self.tasks else "chain()"


# -- group ------------------------------------------------------------------------


@_register("group")
class group(_TaskList):
    """Run tasks in parallel; the GroupResult gives values back in call order."""

    _kind = "group"

    def __or__(self, other: Any) -> Signature:  # type: ignore[override]
        if isinstance(other, group):
            return chain(self, other, app=self._app_ref)
        if isinstance(other, Signature):
            return chord(self.tasks, other, app=self._app_ref, **self.options)
        return NotImplemented

    def freeze(self, _id: str | None = None, group_id: str | None = None, **kw: Any) -> GroupResult:
        from .result import GroupResult

        gid = group_id or _id or self.options.get("task_id") or str(uuid.uuid4())
        self.options["task_id"] = gid
        results = []
        for index, t in enumerate(self.tasks):
            t.options["group_id"] = gid
            t.options["group_index"] = index
            results.append(t.freeze())
        return GroupResult(gid, results, app=self.app)

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        if self.app.conf.task_always_eager:
            return self.apply(args, kwargs, **options)
        gres = self.freeze(options.pop("task_id", None), options.pop("group_id", None))
        a = tuple(args or ()) + self.args
        opts = {**self.options, **options}
        opts.pop("task_id", None)
        with self.app.batch():
            for t in self.tasks:
                t.apply_async(a, kwargs, **opts)
        return gres

    def apply(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        from .result import GroupResult

        gid = str(uuid.uuid4())
        a = tuple(args or ()) + self.args
        return GroupResult(gid, [t.apply(a, kwargs, **options) for t in self.tasks], app=self.app)

    def __repr__(self) -> str:
        return f"group([{', '.join(repr(t) for t in self.tasks)}])"


# -- chord --------------------------------------------------------------------------


@_register("chord")
class chord(Signature):
    """A group whose results, in order, are passed to a body task once all are done."""

    def __init__(
        self,
        header: Any,
        body: Any = None,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        app: Celery | None = None,
        **options: Any,
    ) -> None:
        if isinstance(header, Mapping):  # a group, its JSON form, or one signature
            header = signature(header, app=app)
            tasks = header.tasks if isinstance(header, group) else [header]
        else:
            tasks = _sigs(header, app)
        app = app or _app_of([*tasks, body])
        super().__init__(
            "celery.chord",
            args,
            {
                "header": group(*tasks, app=app),
                "body": signature(body, app=app) if body is not None else None,
                **(kwargs or {}),
            },
            options,
            subtask_type="chord",
            app=app,
        )

    @property
    def tasks(self) -> list[Signature]:
        return self.header.tasks

    @property
    def header(self) -> group:
        h = self.kwargs["header"]
        if not isinstance(h, group):
            h = group.from_dict(h, app=self._app_ref)
            self.kwargs["header"] = h
        return cast(group, h)

    @property
    def body(self) -> Signature:
        b = self.kwargs.get("body")
        if b is None:
            raise ValueError("chord has no body: call it with one, chord(header)(body)")
        b = signature(b, app=self._app_ref)
        self.kwargs["body"] = b
        return b

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], app: Celery | None = None) -> Signature:
        kw = dict(d.get("kwargs") or {})
        sig = chord(
            kw.pop("header", []),
            kw.pop("body", None),
            d.get("args"),
            kw,
            app=app,
            **dict(d.get("options") or {}),
        )
        sig.immutable = bool(d.get("immutable"))
        return sig

    def clone(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **opts: Any,
    ) -> Signature:
        body = self.kwargs.get("body")
        return chord(
            [t.clone() for t in self.header.tasks],
            signature(body, app=self._app_ref).clone() if body is not None else None,
            tuple(args or ()) + self.args,
            app=self._app_ref,
            **{**self.options, **opts},
        )

    def __call__(self, body: Any = None, *args: Any, **kwargs: Any) -> Any:
        if (
            body is not None
            and isinstance(body, Signature | Mapping)
            and self.kwargs.get("body") is None
        ):
            self.kwargs["body"] = signature(body, app=self._app_ref)
            return self.apply_async(args, kwargs)
        if body is not None:
            args = (body, *args)
        return self.apply_async(args, kwargs)

    def freeze(self, _id: str | None = None, group_id: str | None = None, **kw: Any) -> Any:
        body = self.body
        res = body.freeze(_id)
        gid = self.options.get("group_id") or group_id or str(uuid.uuid4())
        self.options["group_id"] = gid
        res.parent = self.header.freeze(group_id=gid)
        return res

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        app = self.app
        if app.conf.task_always_eager:
            return self.apply(args, kwargs, **options)
        res = self.freeze(options.pop("task_id", None))
        gid = self.options["group_id"]
        header = self.header.tasks
        body = self.body
        a = tuple(args or ()) + self.args
        for key in ("link", "link_error"):
            if key in self.options:
                body.options.setdefault(key, []).extend(self.options[key])
        if not header:
            body.apply_async(([],) if not body.immutable else ())
            return res
        body.options["chord_size"] = len(header)
        app.save_group_for_chord(gid, [t.id for t in header if t.id])
        opts = {
            k: v
            for k, v in {**self.options, **options}.items()
            if k not in ("task_id", "group_id", "link", "link_error", "chain")
        }
        chain_rest = options.get("chain")
        body_dict = dict(body)
        if chain_rest:
            body_dict = dict(
                chain(body, *[signature(s, app=app) for s in reversed(chain_rest)], app=app)
            )
        with app.batch():
            for t in header:
                t.apply_async(a, kwargs, chord=body_dict, **opts)
        return res

    def apply(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        values = self.header.apply(tuple(args or ()) + self.args, kwargs).get()
        return self.body.apply((values,) if not self.body.immutable else ())

    def __repr__(self) -> str:
        body = self.kwargs.get("body")
        return f"chord([{', '.join(repr(t) for t in self.header.tasks)}], {body!r})"


# -- map, starmap, chunks -----------------------------------------------------------


class _basemap(Signature):
    _task_name = ""
    _kind = ""

    def __init__(
        self, task: Any, it: Iterable[Any], app: Celery | None = None, **options: Any
    ) -> None:
        app = app or _app_of([task])
        super().__init__(
            self._task_name,
            (),
            {
                "task": signature(task, app=app),
                "it": [list(x) if isinstance(x, tuple | range) else x for x in it],
            },
            options,
            subtask_type=self._kind,
            immutable=True,
            app=app,
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], app: Celery | None = None) -> Signature:
        kw = d.get("kwargs") or {}
        return cls(kw["task"], kw["it"], app=app, **dict(d.get("options") or {}))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async()

    def __repr__(self) -> str:
        task = signature(self.kwargs["task"])
        return f"[{task.task}(x) for x in {saferepr(self.kwargs['it'], 100)}]"


@_register("xmap")
class xmap(_basemap):
    """``task.map(it)``: one message whose worker calls the task for each item."""

    _task_name = "celery.map"
    _kind = "xmap"


@_register("xstarmap")
class xstarmap(_basemap):
    """``task.starmap(it)``: like map, each item unpacked as the arguments."""

    _task_name = "celery.starmap"
    _kind = "xstarmap"

    def __repr__(self) -> str:
        task = signature(self.kwargs["task"])
        return f"[{task.task}(*x) for x in {saferepr(self.kwargs['it'], 100)}]"


@_register("chunks")
class chunks(Signature):
    """Split ``it`` into ``n``-sized starmap messages; results come back as a list of lists."""

    def __init__(
        self, task: Any, it: Iterable[Any], n: int, app: Celery | None = None, **options: Any
    ) -> None:
        if int(n) < 1:
            raise ValueError(f"chunks() needs a chunk size >= 1, got {n!r}")
        app = app or _app_of([task])
        super().__init__(
            "celery.chunks",
            (),
            {"task": signature(task, app=app), "it": [list(x) for x in it], "n": int(n)},
            options,
            subtask_type="chunks",
            immutable=True,
            app=app,
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], app: Celery | None = None) -> Signature:
        kw = d.get("kwargs") or {}
        return cls(kw["task"], kw["it"], kw["n"], app=app, **dict(d.get("options") or {}))

    def group(self) -> group:
        task = signature(self.kwargs["task"], app=self._app_ref)
        it = iter(self.kwargs["it"])
        n = self.kwargs["n"]
        parts = iter(lambda: list(itertools.islice(it, n)), [])
        return group(
            (xstarmap(task, part, app=self._app_ref) for part in parts),
            app=self._app_ref,
            **self.options,
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.apply_async()

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        return self.group().apply_async(None, None, **options)

    def apply(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        return self.group().apply(None, None, **options)

    def __repr__(self) -> str:
        task = signature(self.kwargs["task"])
        return f"{task.task}.chunks({saferepr(self.kwargs['it'], 100)}, {self.kwargs['n']})"
