"""``python -m celeriac``: the same as the ``celeriac`` command."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    main(prog_name="celeriac")
