"""`rectiflux serve`: the model behind an HTTP server (rectiflux.server), with the same model options as the
generating commands. Everything that can be checked before loading the model is (the data folder, the LoRA files,
the address to listen on)."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .options import UsageError, cache_option, debug_option, lora_folder, model_options, whole_type

DEFAULT_PORT = 8188  # ComfyUI's, which the tools that find local servers try first


def port_type(text: str) -> int:
    value = whole_type("the port", 0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"the port must be from 0 to 65535, got {value}")
    return value


def add_parsers(commands) -> None:
    p = commands.add_parser(
        "serve", help="serve a model: a web page and the native, OpenAI and AUTOMATIC1111 APIs",
        description="Serve one model over HTTP: the page at /, the native API under /api/, OpenAI's images API "
                    "under /v1/ and AUTOMATIC1111's under /sdapi/v1/ (docs/server.md).")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=port_type, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT}; 0: any free)")
    g.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on every route but the page "
                                   "(default: $RECTIFLUX_TOKEN, else none)")
    g.add_argument("--max-queue", type=whole_type("the queue length"), default=32, metavar="N",
                   help="jobs that may wait; more are answered 429 at once (default: 32)")
    g.add_argument("--data", default="rectiflux-data", metavar="DIR",
                   help="where the history (SQLite), the images and the uploads live (default: ./rectiflux-data)")
    g.add_argument("--lora-dir", metavar="DIR",
                   help="offer every .safetensors LoRA in DIR and its subfolders, by file name without suffix (off "
                        "unless a request names it; default: the loras/ or Lora/ of --comfyui-models); --lora ones "
                        "are on by default")
    g.add_argument("--max-upload-mb", type=whole_type("the upload limit"), default=32, metavar="MB",
                   help="largest image a request may send, in MiB (default: 32)")
    g.add_argument("--max-upload-megapixels", type=whole_type("the pixel limit"), default=64, metavar="MP",
                   help="largest image a request may send, in millions of pixels (default: 64)")
    g.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN to call the APIs (repeatable; default: none)")
    g.add_argument("--ray-replicas", type=whole_type("the number of replicas"), metavar="N",
                   help="serve on Ray Serve with N replicas, each a model worker (one GPU each, else one CPU), "
                        "sharing --data; joins $RAY_ADDRESS, else starts a local Ray")
    cache_option(p.add_argument_group("sampling"))
    model_options(p)
    debug_option(p)


def lora_catalogue(args: argparse.Namespace) -> list[Any]:
    from ..server.engine import Lora
    from ..weights.checkpoint import SAFETENSORS_SUFFIXES

    loras: dict[str, Lora] = {}
    for path, scale in args.loras:
        if not Path(path).is_file():
            raise UsageError(f"no LoRA file at {path} (--lora)")
        name = Path(path).stem
        if name in loras:
            raise UsageError(f"two LoRAs are named {name} (--lora): rename one")
        loras[name] = Lora(name, os.path.abspath(path), scale, active=True)
    folder = Path(args.lora_dir) if args.lora_dir else lora_folder(args.comfyui_models)
    if folder is not None:
        if not folder.is_dir():
            raise UsageError(f"no folder at {folder} (--lora-dir)")
        # subfolders too, named by the file's stem, as AUTOMATIC1111 and ComfyUI list their LoRA folders
        for path in sorted(p for p in folder.rglob("*") if p.suffix in SAFETENSORS_SUFFIXES and p.is_file()):
            if path.stem not in loras:
                loras[path.stem] = Lora(path.stem, str(path.absolute()), 1.0, active=False)
    return list(loras.values())


def listen(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    return sock


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build(args: argparse.Namespace, recover: bool = True) -> tuple[Any, Any]:
    """The app and its engine, the model loaded; the worker not started yet. `recover`: mark the jobs a dead run
    left unfinished as interrupted (not in a Ray replica: the others' jobs are alive)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("rectiflux serve needs FastAPI and uvicorn: pip install 'rectiflux[serve]'") from None
    from ..server.app import ServerOptions, create_app
    from ..server.engine import Engine
    from ..server.history import History
    from .generate import pick_device, prepare_pipeline
    from .recipe import make_request, transformer_files, weights_sha256

    data = Path(args.data)
    try:
        data.mkdir(parents=True, exist_ok=True)
        history = History(data / "history.sqlite3")
    except Exception as e:  # OSError, sqlite3.Error: a folder we cannot use
        raise UsageError(f"cannot use {data} for the server's data (--data): {e}") from None
    loras = lora_catalogue(args)
    base_args = argparse.Namespace(**{**vars(args), "command": "generate", "prompt": "", "num_images": 1, "seed": 0,
                                      "loras": []})
    base = make_request(base_args, {})
    base.dtype = base.dtype or "auto"
    pipe = prepare_pipeline(base, pick_device(base.device), args.debug)
    engine = Engine(pipe, base, weights_sha256(transformer_files(pipe.source)), data, history, args.max_queue,
                    loras)
    engine.preload([lora.name for lora in loras if lora.active])
    if recover:
        recover_history(history)
    options = ServerOptions(token=args.token or os.environ.get("RECTIFLUX_TOKEN") or None,
                            max_upload_bytes=args.max_upload_mb << 20,
                            max_upload_pixels=args.max_upload_megapixels * 1_000_000, cors=args.cors)
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and options.max_upload_pixels > Image.MAX_IMAGE_PIXELS:
        # PIL refuses images past its own bound in Image.open, before the server's check could allow them
        Image.MAX_IMAGE_PIXELS = options.max_upload_pixels
    return create_app(engine, options), engine


def recover_history(history: Any) -> None:
    """After a crash: unfinished jobs marked interrupted, the temporary files of the images being written removed."""
    for stale in (history.path.parent / "images").glob(".*.png.*.tmp"):
        stale.unlink(missing_ok=True)
    interrupted = history.mark_interrupted(time.time())
    if interrupted:
        print(f"rectiflux: {interrupted} job{'s' if interrupted > 1 else ''} left unfinished by the last run "
              "marked interrupted", file=sys.stderr)


def replica_app(args: argparse.Namespace) -> Any:
    """What each Ray Serve replica runs: its own model and worker behind the same app."""
    app, engine = build(args, recover=False)
    engine.start()
    return app


def run_on_ray(args: argparse.Namespace) -> int:
    """The app behind a Ray Serve deployment of --ray-replicas replicas; Ray's proxy listens on --host:--port."""
    import signal

    try:
        import ray
        from ray import serve
    except ImportError:
        raise UsageError("--ray-replicas needs Ray Serve: pip install 'rectiflux[ray]'") from None
    from ..server.history import History

    listen(args.host, args.port).close()  # a taken port is known at once
    data = Path(args.data)
    try:
        data.mkdir(parents=True, exist_ok=True)
        history = History(data / "history.sqlite3")
    except Exception as e:
        raise UsageError(f"cannot use {data} for the server's data (--data): {e}") from None
    recover_history(history)  # once, here: each replica's jobs are its own
    history.close()
    args.data = str(data.absolute())
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        serve.start(http_options={"host": args.host, "port": args.port}, logging_config={"log_level": "WARNING"})
        gpus = int(ray.cluster_resources().get("GPU", 0))
        def builder() -> Any:  # a plain function: Ray Serve calls it on each replica to get the app
            return replica_app(args)

        deployment = serve.deployment(serve.ingress(builder)(), name="rectiflux",
                                      num_replicas=args.ray_replicas,
                                      ray_actor_options={"num_gpus": 1} if gpus else {"num_cpus": 1},
                                      max_ongoing_requests=args.max_queue + 1)
        serve.run(deployment.bind(), name="rectiflux", route_prefix="/")
        print(f"rectiflux: serving on http://{args.host}:{args.port}/ with {args.ray_replicas} Ray Serve replicas "
              f"(data in {args.data}; Ctrl+C stops)", file=sys.stderr, flush=True)
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


@contextlib.contextmanager
def serving_in_thread(args: argparse.Namespace) -> Iterator[tuple[str, Any]]:
    """`rectiflux serve ARGS` in a thread of this process, on a free loopback port (for programs that embed the
    server, the tests and the benchmarks): yields (base URL, engine); the server and its worker stop after."""
    import threading

    import uvicorn

    app, engine = build(args)
    engine.start()
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    finally:
        server.should_exit = True
        thread.join(10)
        engine.stop()
        engine.history.close()
        sock.close()


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    if args.ray_replicas:
        return run_on_ray(args)
    sock = listen(args.host, args.port)  # before minutes of loading: a taken port is known at once
    if not is_loopback(args.host) and not (args.token or os.environ.get("RECTIFLUX_TOKEN")):
        print(f"rectiflux: warning: listening on {args.host} without --token: anyone who can reach this machine "
              "can use the model and read the history", file=sys.stderr)
    app, engine = build(args)
    engine.start()
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"rectiflux: serving {app.state.server.model_name} on http://{shown}:{port}/ (data in {args.data}; "
          "Ctrl+C stops)", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop()
        engine.history.close()
    return 0
