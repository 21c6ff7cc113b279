"""``celeriac shell``: a Python shell with the app, its tasks and the canvas loaded."""

from __future__ import annotations

import code
import importlib
from typing import Any

import click

from . import CLIContext

CANVAS_NAMES = (
    "signature",
    "subtask",
    "chain",
    "group",
    "chord",
    "chunks",
    "xmap",
    "xstarmap",
    "Task",
    "AsyncResult",
    "GroupResult",
)


def namespace(app: Any, with_tasks: bool = True) -> dict[str, Any]:
    """What the shell starts with: app, celery, canvas helpers and every task by short name."""
    ns: dict[str, Any] = {"app": app, "celery": app}
    celeriac = importlib.import_module("celeriac")
    for name in CANVAS_NAMES:
        if hasattr(celeriac, name):
            ns[name] = getattr(celeriac, name)
    if with_tasks:
        app.loader_import_default_modules()
        for name, task in sorted(app.tasks.items()):
            if name.startswith(("celery.", "celeriac.")):
                continue
            ns.setdefault(name.rsplit(".", 1)[-1], task)
    return ns


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-I", "--ipython", "use", flag_value="ipython", help="Use IPython.")
@click.option("--python", "use", flag_value="python", help="Use the plain Python shell.")
@click.option(
    "-T",
    "--without-tasks",
    is_flag=True,
    help="Do not import the app's task modules or add tasks to the namespace.",
)
@click.pass_context
def shell(ctx: click.Context, use: str | None, without_tasks: bool) -> None:
    """Start a shell with `app` (also `celery`), every task by its short name, and
    signature, chain, group, chord and chunks ready to use.

    IPython is used when it is installed, unless --python is given.
    """
    obj: CLIContext = ctx.obj
    ns = namespace(obj.app, with_tasks=not without_tasks)
    if use != "python":
        try:
            import IPython
        except ImportError:
            if use == "ipython":
                raise click.ClickException(
                    "IPython is not installed (pip install ipython)."
                ) from None
        else:
            IPython.start_ipython(argv=[], user_ns=ns)
            return
    banner = "celeriac shell: " + ", ".join(sorted(ns))
    code.interact(banner=banner, local=ns, exitmsg="")
