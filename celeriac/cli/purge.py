"""``celeriac purge``: delete every waiting message from the app's task queues."""

from __future__ import annotations

from typing import Any

import click

from ..control import Control
from . import CLIContext, CommaSeparatedList


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


def queue_names(app: Any, queues: list[str] | None, exclude: list[str] | None) -> list[str]:
    """The -Q queues, or every queue the app declares, minus the -X ones."""
    names = queues or [q.name for q in app.router.declared_queues()]
    dropped = set(exclude or ())
    return sorted({name for name in names if name not in dropped})


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-f", "--force", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "-Q",
    "--queues",
    multiple=True,
    type=CommaSeparatedList(),
    help="Purge only these queues (comma separated).",
)
@click.option(
    "-X",
    "--exclude-queues",
    multiple=True,
    type=CommaSeparatedList(),
    help="Do not purge these queues (comma separated).",
)
@click.pass_context
def purge(
    ctx: click.Context,
    force: bool,
    queues: tuple[list[str], ...],
    exclude_queues: tuple[list[str], ...],
) -> None:
    """Erase all waiting messages from the task queues. There is no undo.

    Without -Q this means every queue the app knows (task_queues, or the default queue).
    Tasks already taken by a worker are not affected.
    """
    obj: CLIContext = ctx.obj
    app = obj.app
    names = queue_names(app, [q for g in queues for q in g], [q for g in exclude_queues for q in g])
    count = len(names)
    if not names:
        obj.echo("No queues to purge.")
        return
    if not force:
        click.confirm(
            f"{obj.style('WARNING', fg='red')}: This will remove all tasks from "
            f"{_plural(count, 'queue')}: {', '.join(names)}.\n"
            "         There is no undo for this operation!\n\n"
            "(to skip this prompt use the -f option)\n"
            "Are you sure you want to delete all tasks?",
            abort=True,
        )
    messages = Control(app).purge(names)
    if messages:
        obj.echo(
            f"Purged {messages} {_plural(messages, 'message')} from "
            f"{count} known task {_plural(count, 'queue')}."
        )
    else:
        obj.echo(f"No messages purged from {count} {_plural(count, 'queue')}.")
