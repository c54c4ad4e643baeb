"""A real `rectiflux serve` for tests: built by the command's own parser, on a free loopback port, in a thread."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def serve_args(data_dir: str | Path, **options: Any):
    """The parsed `rectiflux serve` options: keyword names are the flags with underscores; True is a bare flag, a
    list repeats the flag, `lora` takes (path, scale) pairs."""
    from rectiflux.cli import build_parser

    argv = ["serve", "--data", str(data_dir), "--port", "0"]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif name == "lora":
            for path, scale in value:
                argv += [flag, f"{path}:{scale}"]
        elif isinstance(value, (list, tuple)):
            for item in value:
                argv += [flag, str(item)]
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    return build_parser().parse_args(argv)


def build_app(data_dir: str | Path, **options: Any):
    """(app, engine) for FastAPI's TestClient; the worker is started, stop it with engine.stop()."""
    from rectiflux.cli.serve import build

    app, engine = build(serve_args(data_dir, **options))
    engine.start()
    return app, engine


@contextlib.contextmanager
def live_server(data_dir: str | Path, **options: Any) -> Iterator[str]:
    """Yield the base URL ("http://127.0.0.1:PORT") of a running server; stopped (and its worker) on exit."""
    from rectiflux.cli.serve import serving_in_thread

    with serving_in_thread(serve_args(data_dir, **options)) as (url, _):
        yield url
