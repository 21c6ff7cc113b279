"""The web dashboard (``celeriac dashboard``): Flower's job, on the app's own transport.

Importing this package needs nothing beyond celeriac; :func:`create_app` imports
Starlette, which comes with the ``dashboard`` extra (``pip install 'celeriac[dashboard]'``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = ["create_app"]


def create_app(celeriac_app: Any, **options: Any) -> Starlette:
    """The dashboard's ASGI app; see :func:`celeriac.dashboard.app.create_app`."""
    from .app import create_app as create

    return create(celeriac_app, **options)
