"""``celeriac result``: wait for a task's result and print it."""

from __future__ import annotations

from typing import Any

import click

from . import CLIContext


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("task_id")
@click.option(
    "-t", "--task", metavar="NAME", help="Name of the task, to use its own result backend settings."
)
@click.option(
    "--traceback",
    "show_traceback",
    is_flag=True,
    help="Print the task's traceback instead of its result.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    metavar="SECS",
    help="Give up after this many seconds (default: wait for ever).",
)
@click.pass_context
def result(
    ctx: click.Context, task_id: str, task: str | None, show_traceback: bool, timeout: float | None
) -> None:
    """Wait for the task TASK_ID to finish and print its result.

    A failed task's exception is printed as an error and the exit status is 1.
    """
    obj: CLIContext = ctx.obj
    app = obj.app
    if task:
        try:
            handle: Any = app.tasks[task].AsyncResult(task_id)
        except KeyError:
            raise click.BadParameter(
                f"no task named {task!r} is registered", param_hint="--task"
            ) from None
    else:
        handle = app.AsyncResult(task_id)
    if show_traceback:
        obj.echo(str(handle.traceback or ""))
        return
    try:
        value = handle.get(timeout=timeout)
    except Exception as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from None
    obj.echo(str(value))
