"""The ``celeriac`` command: global options, app loading, and lazily imported sub-commands.

Each sub-command lives in its own module as a click command of the same name
(``celeriac.cli.beat:beat``); a module that is not there simply is not listed. Sub-commands
get the app from ``ctx.obj.app`` (a :class:`CLIContext`), loaded on first use so that
``--help`` never imports user code.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:  # click >= 8.2 makes ParamType generic; older versions are not subscriptable
    ParamBase = click.ParamType[Any]
else:
    ParamBase = click.ParamType

__all__ = [
    "EX_FAILURE",
    "EX_UNAVAILABLE",
    "EX_USAGE",
    "AppLoadError",
    "CLIContext",
    "CommaSeparatedList",
    "ParamBase",
    "find_app",
    "main",
]

EX_FAILURE = 1
EX_USAGE = 64
EX_UNAVAILABLE = 69

# name -> "module:attribute"; modules owned by other parts of the project appear once written.
SUBCOMMANDS: dict[str, str] = {
    "worker": "celeriac.cli.worker:worker",
    "beat": "celeriac.cli.beat:beat",
    "call": "celeriac.cli.call:call",
    "result": "celeriac.cli.result:result",
    "purge": "celeriac.cli.purge:purge",
    "shell": "celeriac.cli.shell:shell",
    "inspect": "celeriac.cli.inspect:inspect",
    "control": "celeriac.cli.inspect:control",
    "status": "celeriac.cli.inspect:status",
    "events": "celeriac.cli.events:events",
    "dashboard": "celeriac.cli.dashboard:dashboard",
    "report": "celeriac.cli.report:report",
    "multi": "celeriac.cli.multi:multi",
}

# Global options that Celery 4 let you put after the sub-command (`celery worker -A proj`).
_HOISTABLE = {
    "-A": "--app",
    "--app": "--app",
    "-b": "--broker",
    "--broker": "--broker",
    "--result-backend": "--result-backend",
    "--config": "--config",
    "--workdir": "--workdir",
    "--loader": "--loader",
}
_NO_HOIST = {"multi"}  # multi passes its arguments on to the workers it starts


class AppLoadError(click.ClickException):
    """The -A value could not be turned into an app; exits 2 like a usage error."""

    exit_code = 2

    def __init__(self, detail: str) -> None:
        super().__init__(f"Unable to load celery application. {detail}")


class CommaSeparatedList(ParamBase):
    """``-Q a,b -Q c`` style values as one list."""

    name = "LIST"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, list):
            return value
        return [part.strip() for part in str(value).split(",") if part.strip()]


def _celery_class() -> type[Any]:
    from ..app import Celery

    return Celery


def _import(name: str) -> ModuleType:
    """Import a module, telling "not there" apart from "broken"."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing == name or name.startswith(missing + "."):
            raise AppLoadError(
                f"The module {name} was not found. (Looked in {os.getcwd()} and sys.path; "
                f"use --workdir or run from the directory that holds it.)"
            ) from None
        raise AppLoadError(_broken(name, exc)) from None
    except Exception as exc:
        raise AppLoadError(_broken(name, exc)) from None


def _broken(name: str, exc: BaseException) -> str:
    """The user's own error, with where it happened but without our frames."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    if frames:
        last = frames[-1]
        where = f'\n  File "{last.filename}", line {last.lineno}, in {last.name}'
    if isinstance(exc, SyntaxError):
        where = ""
    what = "".join(traceback.format_exception_only(type(exc), exc)).rstrip()
    return f"While trying to load the module {name} the following error occurred:{where}\n{what}"


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _call_factory(spec: str, factory: Any) -> Any:
    if not callable(factory):
        raise AppLoadError(f"{spec!r}: the object is not callable.")
    try:
        return factory()
    except Exception as exc:
        raise AppLoadError(_broken(spec, exc)) from None


def _instances(module: ModuleType, cls: type[Any]) -> list[str]:
    return [name for name, value in vars(module).items() if isinstance(value, cls)]


def find_app(spec: str) -> Any:
    """Resolve ``pkg``, ``pkg.module``, ``pkg.module:attr`` or ``pkg.module:factory()``.

    For a bare module, as Celery does: attribute ``app``, then ``celery``, then the one
    Celery instance in it, then the submodule ``<pkg>.celery``.
    """
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    cls = _celery_class()
    module_name, colon, attr = spec.partition(":")
    if colon:
        module = _import(module_name)
        call = attr.endswith("()")
        name = attr[:-2] if call else attr
        try:
            found = getattr(module, name)
        except AttributeError:
            raise AppLoadError(f"Module {module_name!r} has no attribute {name!r}.") from None
        if call:
            found = _call_factory(spec, found)
        if not isinstance(found, cls):
            raise AppLoadError(f"{spec!r} is a {type(found).__name__}, not a Celery application.")
        return found
    try:
        module = _import(spec)
    except AppLoadError:
        # `proj.app` may name an attribute rather than a module, as in Celery.
        parent, _, last = spec.rpartition(".")
        if not parent or not _exists(parent):
            raise
        found = getattr(_import(parent), last, None)
        if isinstance(found, cls):
            return found
        raise
    for name in ("app", "celery"):
        found = getattr(module, name, None)
        if isinstance(found, cls):
            return found
    candidates = _instances(module, cls)
    if len(candidates) == 1:
        return getattr(module, candidates[0])
    if len(candidates) > 1:
        raise AppLoadError(
            f"Module {spec!r} holds several Celery applications ({', '.join(candidates)}); "
            f"choose one with -A {spec}:{candidates[0]}."
        )
    if hasattr(module, "__path__"):
        sub = f"{spec}.celery"
        if _exists(sub):
            return find_app(sub)
    raise AppLoadError(
        f"Module {spec!r} has no attribute 'app' or 'celery', no Celery instance, "
        f"and no submodule '{spec}.celery'. Name the app with -A {spec}:<attribute>."
    )


class CLIContext:
    """What every sub-command gets as ``ctx.obj``; the app is loaded on first access."""

    def __init__(
        self,
        app_spec: str | None = None,
        broker: str | None = None,
        result_backend: str | None = None,
        config: str | None = None,
        no_color: bool = False,
        quiet: bool = False,
        app: Any = None,
    ) -> None:
        self.app_spec = app_spec
        self.broker = broker
        self.result_backend = result_backend
        self.config = config
        self.no_color = no_color
        self.quiet = quiet
        self._preset = app
        self._app: Any = None

    @property
    def app(self) -> Any:
        if self._app is None:
            self._app = self._load()
        return self._app

    def _load(self) -> Any:
        from ..exceptions import ImproperlyConfigured

        if self._preset is not None:
            app = self._preset
        else:
            app = find_app(self.app_spec) if self.app_spec else _celery_class()()
        try:
            if self.config:
                app.config_from_object(self.config)
            if self.broker:
                app.conf.broker_url = self.broker
            if self.result_backend:
                app.conf.result_backend = self.result_backend
        except ImproperlyConfigured as exc:
            raise click.ClickException(str(exc)) from None
        except ImportError as exc:
            raise click.ClickException(f"--config {self.config}: {exc}") from None
        return app

    def style(self, text: str, **kwargs: Any) -> str:
        return text if self.no_color else click.style(text, **kwargs)

    def echo(self, message: str = "", err: bool = False) -> None:
        click.echo(message, err=err, color=False if self.no_color else None)


def _hoist(args: Sequence[str], commands: set[str]) -> list[str]:
    """Move global options written after the sub-command to before it (Celery 4 style)."""
    args = list(args)
    position, i = None, 0
    while i < len(args):
        if args[i] in commands:
            position = i
            break
        i += 2 if args[i] in _HOISTABLE else 1  # skip an option's value
    if position is None or args[position] in _NO_HOIST:
        return args
    head, sub, rest = args[:position], args[position], args[position + 1 :]
    moved: list[str] = []
    kept: list[str] = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--":
            kept.extend(rest[i:])
            break
        name, eq, value = arg.partition("=")
        if name in _HOISTABLE and name.startswith("--") and eq:
            moved.append(f"{_HOISTABLE[name]}={value}")
        elif arg in _HOISTABLE and i + 1 < len(rest):
            moved.extend([_HOISTABLE[arg], rest[i + 1]])
            i += 1
        elif arg[:2] in ("-A", "-b") and len(arg) > 2 and not arg.startswith("--"):
            moved.extend([_HOISTABLE[arg[:2]], arg[2:]])
        else:
            kept.append(arg)
        i += 1
    return head + moved + [sub] + kept


class CeleriacGroup(click.Group):
    """Sub-commands imported only when used; global options accepted after them too."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        names = set(self.commands)
        for name, target in SUBCOMMANDS.items():
            module = target.partition(":")[0]
            if importlib.util.find_spec(module) is not None:
                names.add(name)
        return sorted(names)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        target = SUBCOMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, _, attr = target.partition(":")
        if importlib.util.find_spec(module_name) is None:
            return None
        command: click.Command = getattr(importlib.import_module(module_name), attr)
        return command

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0] if args else ""
        if args and self.get_command(ctx, name) is None and not name.startswith("-"):
            close = difflib.get_close_matches(name, self.list_commands(ctx), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise click.UsageError(f"No such command {name!r}.{hint}", ctx)
        return super().resolve_command(ctx, args)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _hoist(args, set(self.list_commands(ctx))))


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("celeriac")
    except PackageNotFoundError:
        return str(getattr(importlib.import_module("celeriac"), "__version__", "unknown"))


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"celeriac {_version()}")
        ctx.exit(0)


@click.group(
    cls=CeleriacGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    invoke_without_command=False,
)
@click.option(
    "-A",
    "--app",
    "app_spec",
    envvar="CELERY_APP",
    metavar="APP",
    help="The app to use: a module (proj, proj.tasks), module:attribute (proj:app) or "
    "module:factory() (proj:create_app()). May also be given after the sub-command.",
)
@click.option("-b", "--broker", metavar="URL", help="Broker URL; overrides broker_url.")
@click.option(
    "--result-backend", metavar="URL", help="Result backend URL; overrides result_backend."
)
@click.option("--loader", hidden=True, help="Accepted for Celery compatibility; ignored.")
@click.option(
    "--config",
    envvar="CELERY_CONFIG_MODULE",
    metavar="MODULE",
    help="Module to load settings from (app.config_from_object(MODULE)).",
)
@click.option(
    "--workdir",
    type=click.Path(exists=True, file_okay=False),
    help="Change to this directory before loading the app.",
)
@click.option("-C", "--no-color", is_flag=True, help="Do not colour the output.")
@click.option("-q", "--quiet", is_flag=True, help="Print less.")
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and exit.",
)
@click.pass_context
def main(
    ctx: click.Context,
    app_spec: str | None,
    broker: str | None,
    result_backend: str | None,
    loader: str | None,
    config: str | None,
    workdir: str | None,
    no_color: bool,
    quiet: bool,
) -> None:
    """celeriac: a Celery-compatible distributed task queue.

    \b
    Examples:
      celeriac -A proj worker -l INFO -Q celery,images
      celeriac -A proj status
      celeriac -A proj inspect active
      celeriac -A proj call proj.tasks.add --args '[2, 2]'
    """
    if workdir:
        os.chdir(workdir)
    # app.worker_main()/app.start() pass the app in as obj={"app": app}.
    preset = ctx.obj.get("app") if isinstance(ctx.obj, dict) else None
    ctx.obj = CLIContext(
        app_spec=app_spec,
        broker=broker,
        result_backend=result_backend,
        config=config,
        no_color=no_color,
        quiet=quiet,
        app=None if app_spec else preset,
    )
