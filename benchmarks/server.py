"""What the server costs: images per minute of the embedded model through `rectiflux serve` against the same
generations in one process, as `rectiflux generate` makes them.

    python -m benchmarks.server [--images 8] [--clients 4] [--rounds 15] [--steps 8,28] [--out docs/bench-server.md]

One process loads the model once. The server side is the app `rectiflux serve` builds, under uvicorn on a loopback
port in a thread, with K client threads: each posts one image's settings (a1111: `POST /sdapi/v1/txt2img`, which
answers with the images; native: `POST /api/jobs`, then the job's event stream to its end, then `GET` the image, as
the page does) and posts the next when answered, so the queue is never empty. The server writes each PNG with its
recipe. The one-process side runs the same requests, on the same loaded pipeline, through what the command line
does per image: `make_image` (with its step timer), `write_png` and `recipe_text`. The sides alternate within
each round (their order swapping round by round), so each round's ratio shares the machine's speed: many short
rounds, since a shared machine's speed drifts by more than the differences measured.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = "a large blue square on the left on a white background"
FINAL = ("done", "failed", "cancelled", "interrupted")
SIDES = {"direct": "one process (make_image + write_png)", "a1111": "server, POST /sdapi/v1/txt2img",
         "native": "server, POST /api/jobs + events + GET image"}


@contextlib.contextmanager
def serving(data: Path, clients: int) -> Iterator[tuple[str, Any]]:
    """(base URL, engine) of `rectiflux serve --data DATA` running in this process, the default model loaded."""
    from rectiflux.cli import build_parser
    from rectiflux.cli.serve import serving_in_thread

    args = build_parser().parse_args(["serve", "--data", str(data), "--port", "0", "--max-queue",
                                      str(max(32, clients))])
    with serving_in_thread(args) as served:
        yield served


def settings(seed: int, steps: int) -> dict[str, Any]:
    return {"prompt": PROMPT, "seed": seed, "steps": steps, "width": 64, "height": 64}


def one_image(client: Any, api: str, seed: int, steps: int) -> bool:
    """Make one image through the server, as a client of that API waits for it. True if the job's event stream
    ended before its last state (then the job is looked up until it ends)."""
    if api == "a1111":
        r = client.post("/sdapi/v1/txt2img", json=settings(seed, steps))
        r.raise_for_status()
        if len(r.json()["images"]) != 1:
            raise RuntimeError(f"seed {seed}: {len(r.json()['images'])} images")
        return False
    r = client.post("/api/jobs", json=settings(seed, steps))
    r.raise_for_status()
    job = r.json()
    with client.stream("GET", f"/api/jobs/{job['id']}/events") as events:
        for line in events.iter_lines():
            if line.startswith("data: ") and '"state"' in line:  # a job event (a preview's data has no quotes)
                job = json.loads(line[len("data: "):])
    cut_short = job["state"] not in FINAL
    while job["state"] not in FINAL:
        time.sleep(0.01)
        job = client.get(f"/api/jobs/{job['id']}").json()
    if job["state"] != "done":
        raise RuntimeError(f"job {job['id']} ended {job['state']}: {job.get('error')}")
    client.get(job["images"][0]["url"]).raise_for_status()
    return cut_short


def server_round(url: str, api: str, seeds: list[int], steps: int, clients: int) -> dict[str, Any]:
    """`clients` threads have every seed's image made through the server: {"seconds", "cpu" (this process's CPU
    seconds meanwhile), "cut_short" (the seeds whose event stream ended early)}."""
    import httpx

    todo = collections.deque(seeds)
    lock = threading.Lock()
    errors: list[BaseException] = []
    cut_short: list[int] = []
    started: list[float] = []
    barrier = threading.Barrier(clients, action=lambda: started.extend((time.perf_counter(), time.process_time())))

    def client() -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            barrier.wait()
            while True:
                with lock:
                    if not todo or errors:
                        return
                    seed = todo.popleft()
                try:
                    if one_image(c, api, seed, steps):
                        cut_short.append(seed)
                except BaseException as e:
                    errors.append(e)
                    return

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return {"seconds": time.perf_counter() - started[0], "cpu": time.process_time() - started[1],
            "cut_short": cut_short}


def clients_round(url: str, api: str, seeds: list[int], steps: int, clients: int, in_process: bool) -> dict:
    """`server_round` in this process's threads, or in a child process's (the clients then share no interpreter
    lock with the server, as clients elsewhere do not, and their CPU time is known: "cpu")."""
    if in_process:
        return {**server_round(url, api, seeds, steps, clients), "cpu": None}
    job = json.dumps({"url": url, "api": api, "seeds": seeds, "steps": steps, "clients": clients})
    proc = subprocess.run([sys.executable, "-m", "benchmarks.server", "--run-clients", job], cwd=ROOT,
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"the clients failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_clients(job: str) -> int:
    """The child's side of `clients_round`: prints server_round's answer as JSON."""
    spec = json.loads(job)
    print(json.dumps(server_round(spec["url"], spec["api"], spec["seeds"], spec["steps"], spec["clients"])))
    return 0


def direct_round(engine: Any, req: Any, seeds: list[int], out: Path) -> float:
    """Seconds to make and write every seed's image as `rectiflux generate` does, on the server's own pipeline."""
    from rectiflux.cli.generate import StepTimer, make_image, write_png
    from rectiflux.cli.recipe import recipe_text

    pipe = engine.pipe
    start = time.perf_counter()
    timer = StepTimer()
    for seed in seeds:
        timer.start()
        result = make_image(pipe, req, seed, {"prompt": req.prompt}, {}, progress=timer)
        write_png(result.images[0], out / f"{seed}.png", recipe_text(req, seed, pipe, engine.model_hash),
                  overwrite=True)
    return time.perf_counter() - start


def pixels(folder: Path) -> list[tuple[int, bytes]]:
    """(seed, RGB bytes) of every PNG in `folder`."""
    from PIL import Image

    out = []
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as im:
            out.append((int(im.text["seed"]), im.convert("RGB").tobytes()))
    return out


def measure(engine: Any, url: str, work: Path, steps: int, args: argparse.Namespace) -> dict[str, dict[str, list]]:
    """Per side: "rates" (images per minute, round by round), and for the server's sides the clients' CPU
    milliseconds per image ("client_ms"; empty with --clients-in thread) and the seeds whose event stream ended
    early ("cut_short")."""
    req = engine.make_job(settings(0, steps), "bench").request  # what the server makes of the same settings
    sides = ["direct", *args.api]
    results: dict[str, dict[str, list]] = {side: {"rates": [], "client_ms": [], "cut_short": []} for side in sides}
    direct_out = work / f"direct-{steps}"
    direct_out.mkdir()
    in_process = args.clients_in == "thread"
    warm_up = [10**6 + steps]  # one image each side, compared too
    direct_round(engine, req, warm_up, direct_out)
    for api in args.api:
        results[api]["cut_short"] += clients_round(url, api, warm_up, steps, 1, in_process)["cut_short"]
    for r in range(args.rounds):
        seeds = [1000 * steps + r * args.images + i for i in range(args.images)]
        for side in (sides if r % 2 == 0 else sides[::-1]):
            if side == "direct":
                seconds = direct_round(engine, req, seeds, direct_out)
            else:
                answer = clients_round(url, side, seeds, steps, args.clients, in_process)
                seconds = answer["seconds"]
                results[side]["cut_short"] += answer["cut_short"]
                if answer["cpu"] is not None:
                    results[side]["client_ms"].append(1000 * answer["cpu"] / len(seeds))
            results[side]["rates"].append(60 * len(seeds) / seconds)
            print(f"{steps} steps, round {r + 1}, {side}: {results[side]['rates'][-1]:.0f} images/minute", flush=True)
    return results


def spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=8, help="images per side and round (default 8)")
    p.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients (default 4)")
    p.add_argument("--rounds", type=int, default=15, help="rounds, the sides alternating within each (default 15)")
    p.add_argument("--steps", default="8,28", help="comma-separated step counts (default 8,28: the model's "
                                                  "default and FLUX.1-dev's usual)")
    p.add_argument("--api", default="a1111,native", help="server routes to measure: a1111, native (default both)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench-server.md")
    p.add_argument("--workdir", type=Path, help="where the server's data and the images go (default: the system "
                                                "temp dir; removed after)")
    p.add_argument("--clients-in", choices=("process", "thread"), default="process",
                   help="the HTTP clients' threads in a child process (default: they share no interpreter lock with "
                        "the server) or in this one")
    p.add_argument("--run-clients", metavar="JSON", help=argparse.SUPPRESS)  # the child of --clients-in process
    args = p.parse_args(argv)
    if args.run_clients:
        return run_clients(args.run_clients)
    args.api = [a for a in args.api.split(",") if a]
    if not args.api or set(args.api) - {"a1111", "native"}:
        p.error("--api takes a1111 and/or native")
    steps_list = [int(s) for s in args.steps.split(",")]
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the other benchmarks; torch is not loaded yet
    from benchmarks.bench import machine, write_report

    lines = ["# What the server costs", "",
             f"`{' '.join(['python -m benchmarks.server', *(sys.argv[1:] if argv is None else argv)])}`, "
             f"{datetime.now().astimezone().isoformat(timespec='seconds')}", ""]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        with serving(work / "data", args.clients) as (url, engine):
            import torch

            lines += [*machine(torch.get_num_threads(), "cpu", str(engine.pipe.dtype).removeprefix("torch."))[:2],
                      f"- torch threads: {torch.get_num_threads()}, OMP_WAIT_POLICY="
                      f"{os.environ.get('OMP_WAIT_POLICY')}; the server (uvicorn and its worker thread) and the "
                      "one-process side share this process and its loaded model, float32 on the CPU", ""]
            results = {steps: measure(engine, url, work, steps, args) for steps in steps_list}
        direct = {seed: data for steps in steps_list for seed, data in pixels(work / f"direct-{steps}")}
        compared = [data == direct[seed] for seed, data in pixels(work / "data" / "images") if seed in direct]
        same, different = sum(compared), len(compared) - sum(compared)

    lines += [f"The embedded shapes model, 64x64, the prompt \"{PROMPT}\"; {args.images} images per side and round, "
              f"{args.rounds} rounds, the sides in turn within each round (their order reversed every other round); "
              f"{args.clients} HTTP clients on the server's side, each posting one image's settings and the next when "
              "answered, as threads of "
              + ("a child process (on the same cores as the server, but not under its interpreter lock)"
                 if args.clients_in == "process" else "the server's own process (under its interpreter lock)")
              + ". Images per minute: median (min-max) over the rounds; the overhead is how much longer an image "
              "takes through the server, round by round (direct rate / server rate - 1), median (min-max); the time "
              "added per image (median), and how much of it is the clients' own CPU time (they run on the same "
              "cores; known when they run in a child process). Other work on the machine only ever slows a round "
              "down, so the overhead of the best rounds (the fastest server round against the fastest one-process "
              "round) is shown too.", "",
              "| steps | side | images/minute | overhead | best rounds | added per image | of which the clients' CPU |",
              "|---|---|---|---|---|---|---|"]
    verdicts, cut_short = [], 0
    for steps, sides in results.items():
        direct = sides["direct"]["rates"]
        for side, result in sides.items():
            rates = result["rates"]
            if side == "direct":
                lines.append(f"| {steps} | {SIDES[side]} | {spread(rates, '.0f')} | | | | |")
                continue
            overhead = [100 * (d / s - 1) for d, s in zip(direct, rates, strict=True)]
            added = [60_000 / s - 60_000 / d for d, s in zip(direct, rates, strict=True)]
            client = f"{statistics.median(result['client_ms']):.1f} ms" if result["client_ms"] else "n/a"
            lines.append(f"| {steps} | {SIDES[side]}, {args.clients} clients | {spread(rates, '.0f')} | "
                         f"{spread(overhead, '.1f')} % | {100 * (max(direct) / max(rates) - 1):.1f} % | "
                         f"{statistics.median(added):.1f} ms | {client} |")
            median = statistics.median(overhead)
            verdicts.append(f"{side} at {steps} steps {median:.1f} % ({'within' if median <= 10 else 'beyond'} the "
                            "10 % target)")
            cut_short += len(result["cut_short"])
    lines += ["", "Overhead: " + "; ".join(verdicts) + ".", "",
              f"Each image the server made against the one-process image of the same seed and steps: {same} "
              f"identical pixel for pixel, {different} different."]
    if "native" in args.api:
        lines += ["", f"Event streams (`GET /api/jobs/{{id}}/events`) that ended before their job's last state: "
                      f"{cut_short} (their client then asked `GET /api/jobs/{{id}}` until the job ended)."]
    write_report(args.out, lines)
    return 0 if different == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
