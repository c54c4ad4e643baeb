"""The one progress reporter of the library, the CLI, the trainer and the server: a tqdm bar on stderr."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str | None = None, disable: bool | None = None, **options: Any) -> tqdm:
    """A bar for `total` steps, labelled `desc`. By default it is drawn only when stderr is a terminal (a log file or
    a pipe gets no carriage-return clutter); `disable=False` draws it anyway. `options` are tqdm's."""
    if disable is None:
        stream = options.get("file") or sys.stderr
        disable = not (hasattr(stream, "isatty") and stream.isatty())
    options.setdefault("file", sys.stderr)
    options.setdefault("dynamic_ncols", True)
    return tqdm(total=total, desc=desc, disable=disable, **options)
