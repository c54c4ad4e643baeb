"""The web application: the page, the native API under /api/, and the OpenAI (`openai_api.py`) and AUTOMATIC1111
(`a1111.py`) routes, all over one `Engine`. Errors are one line in the shape each API's clients expect: OpenAI's
`{"error": {...}}` under /v1/, `{"detail": ...}` elsewhere."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..cli.options import UsageError
from ..cli.recipe import read_recipe
from ..pipelines.flux import MAX_SIDE
from .engine import FINAL, Engine, Job, QueueFull
from .settings import MAX_IMAGES, UPLOAD_ID, BadSettings
from .uploads import UploadError, decode_image, store_image

STATIC = Path(__file__).parent / "static"
IMAGE_NAME = re.compile(r"[0-9a-f]{16}-[0-9]+\.png")
PUBLIC = ("/", "/favicon.ico")  # and /static/: the page loads before it can know a token
COMMON_SIZES = ((1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
                (512, 512))
DRAIN_LIMIT = 16 << 20  # bytes of a refused body read before answering; past that the connection is dropped
HISTORY_POLL = 0.25  # seconds between looks at the history for a job another process runs
KEEPALIVE = 15.0  # seconds between comments on an idle event stream, so proxies keep it open


@dataclass
class ServerOptions:
    token: str | None = None
    max_upload_bytes: int = 32 << 20
    max_upload_pixels: int = 64_000_000
    cors: list[str] = field(default_factory=list)


class JobSettings(BaseModel):
    """The settings of POST /api/jobs (documentation: the values are checked by rectiflux.server.settings)."""

    model_config = ConfigDict(extra="forbid")
    mode: str = "generate"
    prompt: str
    negative_prompt: str | None = None
    true_cfg: float | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    strength: float | None = None
    num_images: int | None = None
    max_sequence_length: int | None = None
    cache: float | None = None
    image: str | None = None
    mask: str | None = None
    control_image: str | None = None
    keep_reference_size: bool | None = None
    loras: list[dict[str, Any]] | None = None


# ----------------------------------------------------------------------------------------------------------------
# errors

def is_openai(path: str) -> bool:
    return path.startswith("/v1/")


def error_body(path: str, status: int, message: str) -> dict[str, Any]:
    if is_openai(path):
        kind = "invalid_request_error" if status < 500 else "server_error"
        code = {401: "invalid_api_key", 429: "rate_limit_exceeded", 413: "payload_too_large"}.get(status)
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return {"detail": message}


def error_response(request_path: str, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(error_body(request_path, status, message), status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path"))
        text = error.get("msg", "invalid")
        if error.get("type") == "json_invalid":
            text = f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'decode error')})"
            where = ""
        parts.append(f"{where}: {text}" if where else text)
    return "; ".join(parts) or "invalid request"


class Guard:
    """ASGI middleware: the token (every route but the page) and the body size, before the route reads a byte."""

    def __init__(self, app: Any, token: str | None, body_limit: int) -> None:
        self.app, self.token, self.body_limit = app, token, body_limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        headers = dict(scope["headers"])
        if self.token is not None and path not in PUBLIC and not path.startswith("/static/"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                message = "a token is needed: send Authorization: Bearer <token>" if not given else "wrong token"
                await _drain(receive, self.body_limit)
                await error_response(path, 401, message, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
        length = headers.get(b"content-length")
        too_large = f"the request is larger than this server takes ({self.body_limit} bytes)"
        if length is not None and (not length.isdigit() or int(length) > self.body_limit):
            await _drain(receive, self.body_limit)
            await error_response(path, 413, too_large)(scope, receive, send)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.body_limit:
                raise HTTPException(413, too_large)
            return message

        await self.app(scope, counted, send)


async def _drain(receive: Any, limit: int) -> None:
    """Read (and drop) a body we refuse, so that a client still sending it gets our answer, not a reset."""
    seen = 0
    while seen <= DRAIN_LIMIT:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body"):
            return


# ----------------------------------------------------------------------------------------------------------------
# the app

class Server:
    """What every route needs: the engine and the options."""

    def __init__(self, engine: Engine, options: ServerOptions) -> None:
        self.engine, self.options = engine, options
        pipe = engine.pipe
        self.model_name = str(pipe.name)
        d = pipe.defaults
        sizes = list(d.known_sizes) if d.known_sizes else list(COMMON_SIZES)
        if (d.width, d.height) not in sizes:
            sizes.insert(0, (d.width, d.height))
        self.presets = [list(s) for s in sizes]

    def info(self) -> dict[str, Any]:
        pipe, engine = self.engine.pipe, self.engine
        d = pipe.defaults
        return {"name": self.model_name, "kind": pipe.kind, "modes": engine.modes(), "version": __version__,
                "defaults": {"steps": d.steps, "guidance": d.guidance, "width": d.width, "height": d.height,
                             "strength": d.strength, "max_sequence_length": d.max_sequence_length},
                "presets": self.presets,
                "loras": [{"name": lora.name, "scale": lora.scale, "active": lora.active}
                          for lora in engine.loras.values()],
                "limits": {"max_side": MAX_SIDE, "max_images": MAX_IMAGES,
                           "max_upload_bytes": self.options.max_upload_bytes,
                           "max_upload_pixels": self.options.max_upload_pixels, "max_queue": engine.max_queue},
                "auth": self.options.token is not None}

    def decode(self, data: bytes, what: str = "image") -> Any:
        if len(data) > self.options.max_upload_bytes:
            raise UploadError(f"the {what} is {len(data)} bytes, more than the {self.options.max_upload_bytes} this "
                              "server takes", status=413)
        return decode_image(data, self.options.max_upload_pixels, what)

    def upload(self, image: Any) -> str:
        return store_image(image, self.engine.uploads_dir)

    def submit(self, settings: Any, origin: str, inputs: dict[str, Any] | None = None) -> Job:
        job = self.engine.make_job(settings, origin, inputs)
        self.engine.submit(job)
        return job

    def record(self, job_id: str) -> tuple[dict[str, Any], Job | None]:
        """A job's record: the live one while in memory, else the history's (404 if neither)."""
        if not re.fullmatch(r"[0-9a-f]{16}", job_id):
            raise HTTPException(404, f"no job {job_id}")
        live = self.engine.job(job_id)
        if live is not None:
            return live.record(), live
        stored = self.engine.history.get(job_id)
        if stored is None:
            raise HTTPException(404, f"no job {job_id}")
        return stored, None

    def job_json(self, record: dict[str, Any], live: Job | None = None) -> dict[str, Any]:
        step, steps = (live.step, live.steps) if live is not None else (0, 0)
        state = record["state"]
        progress = 1.0 if state == "done" else (step / steps if steps else 0.0)
        return {**record, "position": self.engine.position(live) if live is not None else 0, "step": step,
                "steps": steps, "progress": progress,
                "images": [{"name": n, "url": f"/api/images/{n}"} for n in record["images"]],
                "preview": f"/api/jobs/{record['id']}/preview" if live is not None and live.preview else None}

    def image_path(self, name: str) -> Path:
        path = self.engine.images_dir / name
        if not IMAGE_NAME.fullmatch(name) or not path.is_file():
            raise HTTPException(404, f"no image {name}")
        return path

    def retry_after(self) -> str:
        return str(max(1, min(3600, math.ceil(self.engine.seconds_per_job() * (self.engine.queue_length() + 1)))))


async def wait_finished(job: Job) -> None:
    while True:
        version = job.version
        if job.state in FINAL:
            return
        await job.changed(version)


def create_app(engine: Engine, options: ServerOptions) -> FastAPI:
    from . import a1111, openai_api

    server = Server(engine, options)
    app = FastAPI(title="rectiflux", version=__version__, docs_url=None, redoc_url=None,
                  description=f"FLUX.1 images from {server.model_name}: the native API under /api/, OpenAI's images "
                              "API under /v1/, AUTOMATIC1111's under /sdapi/v1/.")
    app.state.server = server
    _docs_page(app)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(request.url.path, exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        path = request.url.path
        return error_response(path, 400 if is_openai(path) else 422, validation_message(exc))

    @app.exception_handler(BadSettings)
    async def bad_settings(request: Request, exc: BadSettings) -> Response:
        return error_response(request.url.path, 400, str(exc))

    @app.exception_handler(UploadError)
    async def bad_upload(request: Request, exc: UploadError) -> Response:
        return error_response(request.url.path, exc.status, str(exc))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> Response:
        return error_response(request.url.path, 429, f"{exc}; try again later", {"Retry-After": server.retry_after()})

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Response:
        message = " ".join(str(exc).split()) or type(exc).__name__
        return error_response(request.url.path, 500, f"{type(exc).__name__}: {message}")

    # ------------------------------------------------------------------------------------------------------------
    # the page

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ------------------------------------------------------------------------------------------------------------
    # the native API

    @app.get("/api/info", tags=["native"])
    async def info() -> dict[str, Any]:
        """The model, its defaults, the size presets, the LoRAs on offer and the limits."""
        return server.info()

    @app.post("/api/uploads", status_code=201, tags=["native"])
    async def upload(request: Request) -> dict[str, Any]:
        """An input image (multipart field `file`), stored as PNG under an id made from its content."""
        data = await _form_file(request, "file")
        image = server.decode(data)
        name = server.upload(image)
        return {"id": name, "width": image.size[0], "height": image.size[1], "url": f"/api/uploads/{name}"}

    @app.get("/api/uploads/{upload_id}", tags=["native"])
    async def uploaded(upload_id: str) -> Response:
        path = engine.uploads_dir / upload_id
        if not UPLOAD_ID.fullmatch(upload_id) or not path.is_file():
            raise HTTPException(404, f"no upload {upload_id}")
        return FileResponse(path, media_type="image/png")

    @app.post("/api/jobs", status_code=202, tags=["native"],
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": JobSettings.model_json_schema()}}}})
    async def submit(request: Request) -> dict[str, Any]:
        """Queue a job (429 with Retry-After when the queue is full)."""
        job = server.submit(await _json(request), "api")
        return server.job_json(job.record(), job)

    @app.get("/api/jobs", tags=["native"])
    async def jobs(limit: int = 50, offset: int = 0) -> dict[str, Any]:
        """The history, newest first."""
        if not 1 <= limit <= 500 or offset < 0:
            raise HTTPException(422, "limit must be from 1 to 500 and offset at least 0")
        out = []
        for record in engine.history.list(limit, offset):
            live = engine.job(record["id"])
            out.append(server.job_json(live.record() if live else record, live))
        return {"jobs": out}

    @app.get("/api/jobs/{job_id}", tags=["native"])
    async def job(job_id: str) -> dict[str, Any]:
        return server.job_json(*server.record(job_id))

    @app.post("/api/jobs/{job_id}/cancel", tags=["native"])
    async def cancel(job_id: str) -> dict[str, Any]:
        """A queued job ends now, a running one at its next step."""
        record, live = server.record(job_id)
        if live is not None:
            engine.cancel(job_id)
            record = live.record()
        else:  # a job of another Ray Serve replica: it reads the request at its next step
            engine.history.request_cancel(job_id)
        return server.job_json(record, live)

    @app.get("/api/jobs/{job_id}/preview", tags=["native"])
    async def preview(job_id: str) -> Response:
        _, live = server.record(job_id)
        if live is None or live.preview is None:
            raise HTTPException(404, f"no preview for job {job_id}")
        return Response(live.preview, media_type="image/png")

    @app.get("/api/jobs/{job_id}/events", tags=["native"])
    async def events(job_id: str) -> StreamingResponse:
        """Server-sent events: `job` at every change, `preview` with each new preview, until the job ends."""
        record, live = server.record(job_id)
        return StreamingResponse(_events(server, record, live), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/api/images/{name}", tags=["native"])
    async def image(name: str) -> Response:
        # read here, not streamed through a thread as FileResponse does: images are small and the hop costs more
        return Response(server.image_path(name).read_bytes(), media_type="image/png",
                        headers={"Cache-Control": "max-age=31536000, immutable"})

    @app.post("/api/png-info", tags=["native"])
    async def png_info(request: Request) -> dict[str, Any]:
        """The settings that made a rectiflux PNG (multipart field `file`), ready for POST /api/jobs."""
        data = await _form_file(request, "file")
        return {"settings": settings_from_png(server, data)}

    app.include_router(openai_api.router(server))
    app.include_router(a1111.router(server))
    # the guard sees every request before the routes: a 401 or 413 costs no parsing
    app.add_middleware(Guard, token=options.token, body_limit=2 * options.max_upload_bytes + (1 << 20))
    if options.cors:  # outside the guard: preflights carry no token, and its refusals need CORS headers too
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=options.cors, allow_methods=["*"],
                           allow_headers=["*"])
    return app


def _docs_page(app: FastAPI) -> None:
    """FastAPI's OpenAPI page at /docs, with Swagger UI's files from the swagger-ui-bundle package when it is
    installed (the serve extra installs it), so the page works offline; else from FastAPI's default CDN."""
    from fastapi.openapi.docs import get_swagger_ui_html

    assets = {}
    try:
        import swagger_ui_bundle

        app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")
        assets = {"swagger_js_url": "/docs-assets/swagger-ui-bundle.js",
                  "swagger_css_url": "/docs-assets/swagger-ui.css",
                  "swagger_favicon_url": "/docs-assets/favicon-32x32.png"}
    except ImportError:
        pass

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="rectiflux API", **assets)


async def _events(server: Server, record: dict[str, Any], live: Job | None):
    if live is None:  # finished and gone from memory, or another replica's: from the history until it ends
        while True:
            yield _event("job", server.job_json(record))
            if record["state"] in FINAL:
                return
            seen, waited = record, 0.0
            while record == seen:
                await asyncio.sleep(HISTORY_POLL)
                record = server.engine.history.get(record["id"]) or seen
                waited += HISTORY_POLL
                if waited >= KEEPALIVE:
                    waited = 0.0
                    yield ": keepalive\n\n"
    sent_preview = -1
    while True:
        version = live.version
        snapshot = server.job_json(live.record(), live)
        yield _event("job", snapshot)
        if live.preview is not None and live.preview_step != sent_preview:
            sent_preview = live.preview_step
            image = "data:image/png;base64," + base64.b64encode(live.preview).decode()
            yield _event("preview", {"step": live.preview_step, "image": image})
        if snapshot["state"] in FINAL:  # the state sent, not the state now: the last event is the final state
            return
        while not await live.changed(version, KEEPALIVE):
            yield ": keepalive\n\n"


def _event(name: str, data: Any) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def _json(request: Request) -> Any:
    body = await request.body()
    try:
        return json.loads(body)
    except ValueError as e:
        raise BadSettings(f"the body is not valid JSON ({e})") from None


async def _form_file(request: Request, name: str) -> bytes:
    try:
        form = await request.form()
    except (AssertionError, ValueError, KeyError) as e:  # not multipart, or a broken one
        raise BadSettings(f"send the image as multipart/form-data field {name!r} ({e})") from None
    item = form.get(name)
    if item is None or isinstance(item, str):
        raise BadSettings(f"send the image as multipart/form-data field {name!r} (a file)")
    return await item.read()


def settings_from_png(server: Server, data: bytes) -> dict[str, Any]:
    """The native settings a rectiflux PNG's recipe holds (its input images are not part of them)."""
    import tempfile

    server.decode(data, "PNG")
    with tempfile.NamedTemporaryFile(suffix=".png") as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            recipe = read_recipe(tmp.name)
        except UsageError as e:
            raise BadSettings(" ".join(str(e).replace(tmp.name, "the PNG").split())) from None
    keys = ("mode", "prompt", "negative_prompt", "seed", "steps", "guidance", "width", "height", "strength",
            "true_cfg", "max_sequence_length", "cache")
    settings = {k: recipe[k] for k in keys if k in recipe}
    for name in ("image", "mask", "control_image"):  # inputs this server still holds come back as upload ids
        path = Path(recipe.get(name, ""))
        if UPLOAD_ID.fullmatch(path.name) and path.parent == server.engine.uploads_dir.absolute() and path.is_file():
            settings[name] = path.name
    names = {lora.path: lora.name for lora in server.engine.loras.values()}
    settings["loras"] = [{"name": names[v["file"]], "scale": v["scale"]} for v in recipe.get("loras", [])
                         if v["file"] in names]
    return settings
