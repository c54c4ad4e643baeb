"""`python -m rectiflux`: the same command line as the `rectiflux` script."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
