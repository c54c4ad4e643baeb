"""The server's one model and its worker: jobs wait in a bounded first-in-first-out queue and run one at a time,
each image through the same call as `rectiflux generate` (`cli.generate.make_image`), written whole with its
recipe. Jobs report their steps and a live preview, and stop at the next step when cancelled.

The worker is a thread: the web server's threads and event loop only queue, look and cancel. Whoever waits on a
job (an HTTP request, a stream of events) is woken through its event loop, never by polling.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import os
import secrets
import socket
import sys
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cli.generate import check_kind, load_inputs, make_image, one_line, pipe_inputs, resolve_settings, write_png
from ..cli.options import UsageError
from ..cli.recipe import Request, recipe_text
from ..sampling.schedule import strength_start
from . import preview
from .history import History
from .settings import BadSettings, parse_settings

FINAL = ("done", "failed", "cancelled", "interrupted")
KEEP_FINISHED = 256
PREVIEW_INTERVAL = 0.2  # seconds between previews at most: a fast model's steps would flood the streams
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # which process ran a job (Ray Serve runs several)
TELL_INTERVAL = 0.1  # and between step counts told to the waiters (state changes are told at once)


class QueueFull(Exception):
    """The queue holds as many jobs as it may: answered with 429 at once."""


class Cancelled(Exception):
    """Raised inside the denoising loop at the step after a cancel."""


@dataclass
class Lora:
    name: str
    path: str
    scale: float  # the scale it is offered at
    active: bool  # used when a request names no LoRAs


@dataclass
class Job:
    id: str
    origin: str
    settings: dict[str, Any]
    request: Request
    inputs: dict[str, Any]
    created: float = field(default_factory=time.time)
    state: str = "queued"
    started: float | None = None
    finished: float | None = None
    step: int = 0
    steps: int = 0
    images: list[str] = field(default_factory=list)
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    preview: bytes | None = None
    preview_step: int = 0
    cancel_requested: bool = False
    version: int = 0
    told: float = 0.0  # perf_counter of the last step told to the waiters
    previewed: float = 0.0  # and of the last preview
    _waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self) -> dict[str, Any]:
        """What the history keeps."""
        return {"id": self.id, "origin": self.origin, "state": self.state, "settings": self.settings,
                "images": self.images, "error": self.error, "warnings": self.warnings, "created": self.created,
                "started": self.started, "finished": self.finished, "worker": WORKER}

    def touch(self) -> None:
        """Something changed: wake everyone waiting (from any thread)."""
        with self._lock:
            self.version += 1
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # that loop is closed: nobody waits there any more
                pass

    async def changed(self, version: int, timeout: float | None = None) -> bool:
        """Wait until the job's version differs from `version` (True) or `timeout` seconds pass (False)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self.version != version:
                return True
            self._waiters.append((loop, future))
        try:
            await asyncio.wait_for(future, timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:  # timed out or cancelled (a client gone): forget this waiter
            with self._lock:
                if (loop, future) in self._waiters:
                    self._waiters.remove((loop, future))


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class Engine:
    """Holds the pipeline; `submit`, `cancel` and `job` may be called from any thread."""

    def __init__(self, pipe: Any, base: Request, model_hash: str, data: Path, history: History, max_queue: int,
                 loras: list[Lora]) -> None:
        self.pipe, self.base, self.model_hash = pipe, base, model_hash
        data = data.absolute()  # the recipes name input files by absolute path, like the CLI's
        self.images_dir, self.uploads_dir = data / "images", data / "uploads"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self.history, self.max_queue = history, max_queue
        self.loras = {lora.name: lora for lora in loras}
        self._queue: collections.deque[Job] = collections.deque()
        self._jobs: dict[str, Job] = {}  # queued and running jobs, and finished ones until their last look
        self._cond = threading.Condition()
        self.current: Job | None = None
        self._stopping = False
        self._loaded_loras: set[str] = set()
        self._recent: collections.deque[str] = collections.deque()
        self._durations: collections.deque[float] = collections.deque(maxlen=20)
        # the worker tokenises while requests are checked; a tokenizer is not safe to share between threads
        self._checker = copy.copy(pipe.text_encoders) if pipe.text_encoders is not None else None
        if self._checker is not None:
            self._checker.t5_tokenizer = copy.deepcopy(pipe.text_encoders.t5_tokenizer)
        self.projection = preview.fit_projection(pipe)
        pipe.set_progress_bar_config(disable=True)
        self._thread = threading.Thread(target=self._work, name="rectiflux-worker", daemon=True)

    # ------------------------------------------------------------------------------------------------------------
    # from the web server's threads

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10) -> None:
        with self._cond:
            self._stopping = True
            if self.current is not None:
                self.current.cancel_requested = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def preload(self, names: list[str]) -> None:
        """Load these LoRAs now (a bad file is refused before the server starts, the model left as it was)."""
        for name in names:
            self.pipe.load_lora_weights(self.loras[name].path, adapter_name=name)
            self._loaded_loras.add(name)
        if self._loaded_loras:
            self.pipe.set_adapters([], [])

    def modes(self) -> list[str]:
        from ..cli.recipe import MODES

        return [mode for mode, kind in MODES.items() if kind == self.pipe.kind]

    def make_job(self, data: Any, origin: str, inputs: dict[str, Any] | None = None) -> Job:
        """A job from client settings, checked as far as can be without running the model (BadSettings if not)."""
        settings = parse_settings(data, set(self.loras))
        chosen = settings.get("loras")
        if chosen is None:
            chosen = [{"name": lora.name, "scale": lora.scale} for lora in self.loras.values() if lora.active]
        paths = {name: str(self.uploads_dir / settings[name]) for name in ("image", "mask", "control_image")
                 if name in settings}
        for name, path in paths.items():
            if not Path(path).is_file():
                raise BadSettings(f"{name}: no upload {settings[name]} on this server")
        req = dataclasses.replace(
            self.base, mode=settings["mode"], prompt=settings["prompt"], negative_prompt=settings["negative_prompt"],
            seed=settings["seed"], num_images=settings["num_images"], true_cfg=settings.get("true_cfg", 1.0),
            steps=settings.get("steps"), guidance=settings.get("guidance"), width=settings.get("width"),
            height=settings.get("height"), strength=settings.get("strength"),
            max_sequence_length=settings.get("max_sequence_length"), cache=settings.get("cache", self.base.cache),
            keep_reference_size=settings.get("keep_reference_size", False),
            loras=[(self.loras[c["name"]].path, c["scale"]) for c in chosen], redux_images=[], **paths)
        try:
            check_kind(req, self.pipe)
            if inputs is None:
                inputs = load_inputs(req)
            resolve_settings(req, self.pipe, inputs)
            self._check_text(req)
        except (UsageError, ValueError) as e:
            raise BadSettings(one_line(e)) from None
        settings["loras"] = chosen
        steps = req.steps
        if req.strength is not None:  # img2img, inpaint and fill skip the first steps
            steps -= strength_start(req.steps, req.strength)
        return Job(id=secrets.token_hex(8), origin=origin, settings=settings, request=req, inputs=inputs,
                   steps=steps * req.num_images)

    def _check_text(self, req: Request) -> None:
        from ..pipelines.flux import check_text

        for name, text in (("the prompt", req.prompt), ("the negative prompt", req.negative_prompt)):
            check_text(name, text)
        if self._checker is not None:
            self._checker.check(req.prompt, None, req.max_sequence_length)
            if req.negative_prompt and req.true_cfg > 1:
                self._checker.check(req.negative_prompt, None, req.max_sequence_length)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is stopping")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} jobs waiting)")
            self.history.save(job.record())
            self._queue.append(job)
            self._jobs[job.id] = job
            self._cond.notify_all()

    def job(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def position(self, job: Job) -> int:
        """1 for the next job to run, 0 for the running one or a finished one."""
        with self._cond:
            try:
                return self._queue.index(job) + 1
            except ValueError:
                return 0

    def seconds_per_job(self) -> float:
        """The recent jobs' mean run time (1 s before any has run)."""
        with self._cond:
            return sum(self._durations) / len(self._durations) if self._durations else 1.0

    def queue_length(self) -> int:
        with self._cond:
            return len(self._queue)

    def cancel(self, job_id: str) -> Job | None:
        """A queued job ends now; a running one at its next step. None: no such live job."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.state in FINAL:
                return job
            if job.state == "queued":
                self._queue.remove(job)
                self._finish(job, "cancelled")
                others = list(self._queue)
            else:
                job.cancel_requested = True
                others = []
        for other in others:
            other.touch()
        job.touch()
        return job

    def _retire(self, job: Job) -> None:
        """Finished jobs stay in memory a while for those about to look (their previews), then only the history
        has them."""
        with self._cond:
            self._recent.append(job.id)
            while len(self._recent) > KEEP_FINISHED:
                old = self._jobs.get(self._recent.popleft())
                if old is not None and old.state in FINAL:
                    del self._jobs[old.id]

    # ------------------------------------------------------------------------------------------------------------
    # the worker thread

    def _finish(self, job: Job, state: str, error: str | None = None) -> None:
        job.state, job.error, job.finished = state, error, time.time()
        if job.started is not None:
            with self._cond:
                self._durations.append(job.finished - job.started)
        self.history.save(job.record())

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                self.current = job
                waiting = list(self._queue)
            for other in waiting:  # their positions moved up
                other.touch()
            try:
                self._run(job)
            finally:
                with self._cond:
                    self.current = None
                job.touch()
                self._retire(job)

    def _run(self, job: Job) -> None:
        if self.history.cancel_requested(job.id):
            self._finish(job, "cancelled")
            return
        job.state, job.started = "running", time.time()
        job.previewed = time.perf_counter()  # the first preview after PREVIEW_INTERVAL: none for quick jobs
        self.history.save(job.record())
        job.touch()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("default")
                try:
                    self._make_images(job)
                finally:
                    job.warnings = list(dict.fromkeys(" ".join(str(w.message).split()) for w in caught))
                    for message in job.warnings:
                        print(f"rectiflux: warning: job {job.id}: {message}", file=sys.stderr)
            self._finish(job, "done")
        except Cancelled:
            if self._stopping:  # the server is stopping, not the client cancelling: as after a crash
                self._finish(job, "interrupted", "the server stopped before this job finished")
            else:
                self._finish(job, "cancelled")
        except (UsageError, ValueError, ArithmeticError) as e:
            self._finish(job, "failed", one_line(e))
        except Exception as e:  # the job fails, the server carries on; the traceback is for the log
            traceback.print_exc(file=sys.stderr)
            self._finish(job, "failed", f"{type(e).__name__}: {one_line(e)}")

    def _make_images(self, job: Job) -> None:
        req = job.request
        self._use_loras(req)
        for k in range(req.num_images):
            if job.cancel_requested:
                raise Cancelled
            out = make_image(self.pipe, req, req.seed + k, {"prompt": req.prompt}, pipe_inputs(job.inputs),
                             **self._hooks(job, k))
            name = f"{job.id}-{k + 1}.png"
            write_png(out.images[0], self.images_dir / name, recipe_text(req, req.seed + k, self.pipe,
                                                                         self.model_hash), overwrite=False)
            job.images.append(name)
            if k < req.num_images - 1:  # after the last one the job's end is told at once
                self.history.save(job.record())
                job.touch()

    def _use_loras(self, req: Request) -> None:
        by_path = {lora.path: lora.name for lora in self.loras.values()}
        names = [by_path[path] for path, _ in req.loras]
        self.preload([name for name in names if name not in self._loaded_loras])  # a bad file is refused whole
        if self._loaded_loras:
            self.pipe.set_adapters(names, [scale for _, scale in req.loras])

    def _hooks(self, job: Job, k: int) -> dict[str, Any]:
        """Progress, cancellation and previews for image k of the job."""
        req, pipe = job.request, self.pipe
        latent_h = 2 * -(-req.height // 16)
        latent_w = 2 * -(-req.width // 16)
        history: list[tuple[Any, float]] = []  # the last two (latents, sigma they are at) for the preview

        def progress(step: int, total: int) -> None:
            job.steps = total * req.num_images
            job.step = total * k + step
            if job.cancel_requested:
                raise Cancelled
            now = time.perf_counter()
            if now - job.told >= TELL_INTERVAL:  # fast steps would keep the event loop (and the GIL) busy
                job.told = now
                if self.history.cancel_requested(job.id):  # asked through another replica
                    raise Cancelled
                job.touch()

        def on_step(pipeline: Any, i: int, t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            x = tensors["latents"]
            sigma = float(t) / pipe.scheduler.num_train_timesteps  # the level step i started from
            if history:
                history[-1] = (history[-1][0], sigma)  # the previous latents sit at the level this step left
            history.append((x.detach().clone(), None))
            del history[:-3]
            now = time.perf_counter()
            if now - job.previewed >= PREVIEW_INTERVAL:
                job.previewed = now
                if len(history) >= 3:  # latents at two known levels: extrapolate to the clean image
                    (before, s_before), (x_at, s_at) = history[-3], history[-2]
                    tokens = preview.predicted_clean(x_at, before, s_before, s_at)
                else:
                    tokens = x
                try:
                    job.preview = preview.preview_png(tokens, latent_h, latent_w, self.projection)
                    job.preview_step = job.step + 1
                except ValueError:  # a grid the latents do not fit (never for the tasks we run): no preview
                    pass
            return {}

        return {"progress": progress, "callback_on_step_end": on_step,
                "callback_on_step_end_tensor_inputs": ["latents"]}
