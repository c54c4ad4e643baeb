"""The `rectiflux` command line: text-to-image, img2img, inpainting, Fill, Control and Kontext edits, each PNG
carrying the recipe that made it; training and evaluating the embedded model.

Contract kept by every command:
  * bad input exits with status 2 and exactly one line on stderr, `rectiflux: error: ...` (`--debug` adds the
    traceback); anything else that goes wrong exits with 1, also in one line; SIGINT exits 130, SIGTERM 143, and
    neither leaves a half-written file;
  * everything that can be checked without the model is checked before the model is loaded;
  * an output file appears whole or not at all, and an existing file is only replaced with `--overwrite`;
  * stdout gets one summary line at the end; the progress bar goes to stderr, and only when stderr is a terminal.

Heavy imports (torch through the pipeline, transformers) happen inside the functions that need them, so that
`--help` and argument errors stay quick, and so that OpenMP's wait policy can still be chosen before torch loads.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from .. import __version__
from . import batch, generate, serve, train
from .options import Parser, UsageError, loras_in_tree
from .recipe import PROG

EPILOG = """examples (each runs as written, in this order):
  rectiflux generate "a large red circle on the left on a white background" --seed 7 -o circle.png
  rectiflux img2img "a large blue circle on the left on a white background" --image circle.png --strength 0.7 \\
      -o blue.png
  python3 -c "from PIL import Image; m = Image.new('L', (64, 64)); m.paste(255, (0, 0, 32, 64)); m.save('mask.png')"
  rectiflux inpaint "a small green square on the left on a white background" --image circle.png --mask mask.png \\
      -o square.png
  rectiflux generate --from-png circle.png -o again.png     # the same image again
"""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every `finally` (temporary files) runs before the exit."""


def _terminate(signum, frame) -> None:
    raise Terminated


def build_parser() -> Parser:
    parser = Parser(prog=PROG, description="Generate images with FLUX.1 models.", epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    generate.add_parsers(commands)
    train.add_parsers(commands)
    batch.add_parsers(commands)
    serve.add_parsers(commands)
    return parser


def run(args) -> int:
    if args.command is None:  # argparse's own message names the metavar only
        raise UsageError(f"give a command: {', '.join(generate.MODES)}, train, train-lora, eval, batch, serve "
                         f"({PROG} --help lists them)")
    loras_in_tree(args)
    if args.command == "train":
        return train.run_train(args)
    if args.command == "eval":
        return train.run_eval(args)
    if args.command == "train-lora":
        return train.run_train_lora(args)
    if args.command == "serve":
        return serve.run_serve(args)
    if args.command == "batch":
        return batch.run_batch(args)
    return generate.run_generate(args)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)


TCACHE_OFF = "glibc.malloc.tcache_count=0"


def environment_without_tcache(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to start this program again in so that glibc runs without its per-thread cache, or None
    where there is nothing to do: not glibc, RECTIFLUX_KEEP_FREED_MEMORY=0, or GLIBC_TUNABLES already sets it.

    A generation keeps freed memory in glibc's heap (rectiflux.runtime.heap). torch's 64-byte-aligned blocks
    leave a small free chunk behind each, and the cache holds those, so a freed block cannot merge with its freed
    neighbours and the heap grows instead (figures: docs/benchmarks.md). glibc reads the switch only at start,
    so the program sets it for itself here, before anything imports torch (which rectiflux.runtime does).
    """
    tunables = environ.get("GLIBC_TUNABLES", "")
    glibc = "CS_GNU_LIBC_VERSION" in getattr(os, "confstr_names", {}) and bool(os.confstr("CS_GNU_LIBC_VERSION"))
    if not glibc or environ.get("RECTIFLUX_KEEP_FREED_MEMORY", "1") == "0" or "glibc.malloc.tcache_count" in tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TCACHE_OFF}" if tunables else TCACHE_OFF}


def _restart_without_tcache() -> None:
    """Replace this process by the same command in `environment_without_tcache`, where that has anything to do."""
    environ = environment_without_tcache(os.environ)
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else Path()
    # only the console script or `python -m rectiflux`: a notebook's kernel or `python -` must not start again
    ours = script.name == PROG or (script.name == "__main__.py" and script.parent.name == "rectiflux")
    if environ is None or not ours or getattr(sys, "frozen", False) or not sys.executable:
        return
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
    except OSError:
        pass  # the cache then stays on, which costs memory, not correctness


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `rectiflux` script and of `python -m rectiflux`; returns the exit status."""
    if argv is None:  # the program itself, not a caller in the same process
        _restart_without_tcache()
    # OpenMP threads that spin while idle make a CPU shared with other work many times slower; sleeping costs
    # nothing measurable on an idle machine (docs/bench-omp.md). Only in effect if torch is not loaded yet.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # known before parsing, so that even a parse error can show its traceback
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return run(build_parser().parse_args(argv))
    except SystemExit as e:  # --help and --version
        return e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return 143
    except (UsageError, ValueError) as e:  # ValueError: the pipeline's own checks (CheckpointError included)
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {generate.one_line(e)}", file=sys.stderr)
        return 2
    except ArithmeticError as e:  # NaN latents: the message says where and why
        if debug:
            traceback.print_exc()
        print(f"{PROG}: error: {generate.one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (run with --debug for the traceback)"
        print(f"{PROG}: error: {type(e).__name__}: {generate.one_line(e)}{hint}", file=sys.stderr)
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
