"""The tutorial's ``vege3``: an app whose ``task_routes`` send ``add`` to ``queue1`` and
``hello`` to ``queue2``.

    celeriac -A vege3 worker -D -l info -Q queue1,queue2 --pidfile= -f vege3.log
    celeriac status -A vege3
    celeriac -A vege3 call vege3.add --args '[2, 2]'      # lands in queue1

Routing is decided where the task is sent, from this configuration: the worker only
chooses which queues to read. A task with no route goes to the default queue ``celery``,
which the worker above does not read.
"""

from __future__ import annotations

from typing import Any

from celeriac import Celery

app = Celery("vege3")
app.conf.task_routes = {
    "vege3.add": {"queue": "queue1"},
    "vege3.hello": {"queue": "queue2"},
}


@app.task
def add(x: Any, y: Any) -> Any:
    return x + y


@app.task
def hello(name: str) -> str:
    return f"hello {name}"
