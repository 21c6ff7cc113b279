"""The tutorial's ``vege4``: workflows. It reuses ``vege``'s app and tasks (so signatures
print as ``vege.hello('haha')``) and adds the crawler from the tutorial's last tip.

    celeriac -A vege4 worker -l info
    >>> from vege4 import page_crawler
    >>> page_crawler().get()
    'stored: Item 42 (USD 9.99)'

The tutorial starts this worker with ``-B`` (beat inside the worker). That is not wired
in yet: the flag is accepted and ignored. Run ``celeriac -A vege4 beat`` beside the worker
to send ``beat_schedule`` below.
"""

from __future__ import annotations

from typing import Any

from vege import add, app, hello, tsum

from celeriac import AsyncResult

app.conf.beat_schedule = {
    "sum-every-30-seconds": {"task": "vege.tsum", "schedule": 30.0, "args": ([1, 2, 3],)},
}


# The crawler: four steps, each waiting for the one before. The steps are stand-ins (no
# network): what matters is how they are joined.


@app.task
def get_url() -> str:
    return "https://shop.example/item/42"


@app.task
def fetch_page(url: str) -> str:
    item = url.rsplit("/", 1)[-1]
    return f"<html><h1>Item {item}</h1><span class=price>USD 9.99</span></html>"


@app.task
def parse_page(page: str) -> dict[str, str]:
    title = page.split("<h1>", 1)[1].split("</h1>", 1)[0]
    price = page.split("class=price>", 1)[1].split("<", 1)[0]
    return {"title": title, "price": price}


@app.task
def store_page(info: dict[str, str]) -> str:
    return f"stored: {info['title']} ({info['price']})"


def page_crawler() -> AsyncResult:
    """The right way: one chain; each step gets the previous step's result."""
    crawl = get_url.s() | fetch_page.s() | parse_page.s() | store_page.s()
    result: AsyncResult = crawl()
    return result


@app.task
def page_crawler_blocking() -> Any:
    """The wrong way, kept to show the error: waiting on a subtask inside a task.

    ``.get()`` inside a task raises RuntimeError (as in Celery), because a worker whose
    slots all wait on each other's subtasks deadlocks.
    """
    url = get_url.delay().get()
    return fetch_page.delay(url).get()


__all__ = [
    "add",
    "app",
    "fetch_page",
    "get_url",
    "hello",
    "page_crawler",
    "page_crawler_blocking",
    "parse_page",
    "store_page",
    "tsum",
]
