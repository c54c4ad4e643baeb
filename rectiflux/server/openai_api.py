"""OpenAI's images API, as its clients (the `openai` SDKs, Open WebUI, ...) call it: generations and edits, with
`seed`, `steps`, `guidance`, `negative_prompt`, `true_cfg` and `strength` taken as extra fields."""

from __future__ import annotations

import base64
import re
import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Request

from .engine import Job
from .settings import BadSettings
from .uploads import openai_mask

if TYPE_CHECKING:
    from .app import Server

SIZE = re.compile(r"\s*(\d+)\s*[xX]\s*(\d+)\s*")
FORMATS = ("b64_json", "url")
EXTRA = ("seed", "steps", "guidance", "negative_prompt", "true_cfg", "strength", "max_sequence_length",
         "keep_reference_size")
# fields of OpenAI's API that only steer OpenAI's own models: accepted and left alone
IGNORED = ("model", "quality", "style", "user", "background", "moderation", "output_compression", "partial_images",
           "stream", "input_fidelity")
NUMERIC = ("n", "seed", "steps", "guidance", "true_cfg", "strength", "max_sequence_length")


def parse_size(value: Any) -> tuple[int | None, int | None]:
    if value is None or value == "auto":
        return None, None
    match = SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise BadSettings(f"size: must be \"WIDTHxHEIGHT\" (e.g. \"1024x1024\") or \"auto\", got {value!r}")
    return int(match[1]), int(match[2])


def settings(body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Native settings and the response format from an OpenAI request body."""
    known = ("prompt", "n", "size", "response_format", "output_format", *EXTRA, *IGNORED)
    unknown = sorted(set(body) - set(known) - {"image", "image[]", "mask"})
    if unknown:
        raise BadSettings(f"unknown parameter{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}")
    fmt = body.get("response_format") or "b64_json"
    if fmt not in FORMATS:
        raise BadSettings(f"response_format: must be b64_json or url, got {fmt!r}")
    if body.get("output_format") not in (None, "png"):
        raise BadSettings(f"output_format: this server makes PNG only, got {body['output_format']!r}")
    width, height = parse_size(body.get("size"))
    out = {"prompt": body.get("prompt"), "num_images": body.get("n", 1), "width": width, "height": height,
           **{k: body[k] for k in EXTRA if k in body}}
    return {k: v for k, v in out.items() if v is not None}, fmt


def _form_number(name: str, value: str) -> Any:
    try:
        number = float(value)
    except ValueError:
        raise BadSettings(f"{name}: must be a number, got {value!r}") from None
    return int(number) if number.is_integer() and name not in ("guidance", "true_cfg", "strength") else number


def router(server: Server) -> APIRouter:
    api = APIRouter(prefix="/v1", tags=["OpenAI"])

    async def respond(job: Job, fmt: str, request: Request) -> dict[str, Any]:
        from .app import wait_finished

        await wait_finished(job)
        if job.state == "cancelled":  # 400, not 5xx: the SDKs retry those, which would make it again
            raise HTTPException(400, "the job was cancelled (POST /api/jobs/ID/cancel or /sdapi/v1/interrupt)")
        if job.state != "done":
            raise HTTPException(500, job.error or f"the job was {job.state}")
        data = []
        for name in job.images:
            if fmt == "url":
                data.append({"url": str(request.base_url).rstrip("/") + f"/api/images/{name}",
                             "revised_prompt": job.request.prompt})
            else:
                encoded = base64.b64encode(server.image_path(name).read_bytes()).decode()
                data.append({"b64_json": encoded, "revised_prompt": job.request.prompt})
        return {"created": int(time.time()), "data": data, "output_format": "png",
                "size": f"{job.request.width}x{job.request.height}"}

    @api.get("/models")
    async def models() -> dict[str, Any]:
        """The one model this server holds, as OpenAI lists models."""
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": 0,
                                            "owned_by": "rectiflux"}]}

    @api.post("/images/generations")
    async def generations(request: Request) -> dict[str, Any]:
        """Text to image: `prompt`, `n`, `size` ("WxH"), `response_format`, and the extra fields."""
        from .app import _json

        body = await _json(request)
        if not isinstance(body, dict):
            raise BadSettings("the body must be a JSON object")
        native, fmt = settings(body)
        job = server.submit(native, "openai")
        return await respond(job, fmt, request)

    @api.post("/images/edits")
    async def edits(request: Request) -> dict[str, Any]:
        """Multipart `image` (and optional `mask`, transparent where to repaint): inpainting with a mask; without
        one a Kontext edit on a Kontext model, else img2img (`strength`)."""
        try:
            form = await request.form()
        except (AssertionError, ValueError, KeyError) as e:
            raise BadSettings(f"send the edit as multipart/form-data ({e})") from None
        files = [v for k in ("image", "image[]") for v in form.getlist(k) if not isinstance(v, str)]
        if not files:
            raise BadSettings("image: send the image to edit as a file")
        if len(files) > 1:
            raise BadSettings("image: this server edits one image at a time")
        image = server.decode(await files[0].read())
        mask_file = form.get("mask")
        body: dict[str, Any] = {k: v for k, v in form.items() if isinstance(v, str)}
        for name in NUMERIC:
            if name in body:
                body[name] = _form_number(name, body[name])
        if "keep_reference_size" in body:
            body["keep_reference_size"] = body["keep_reference_size"].lower() in ("1", "true", "yes")
        native, fmt = settings(body)
        native["image"] = server.upload(image)
        kind = server.engine.pipe.kind
        if mask_file is not None and not isinstance(mask_file, str):
            mask = openai_mask(server.decode(await mask_file.read(), "mask"), image.size)
            native["mask"] = server.upload(mask)
            native["mode"] = "fill" if kind == "fill" else "inpaint"
        else:
            native["mode"] = {"kontext": "edit", "fill": "fill"}.get(kind, "img2img")
            if native["mode"] == "fill":
                raise BadSettings("mask: a FLUX.1-Fill model needs a mask (transparent where to fill)")
        if native["mode"] != "edit":  # the option of Kontext's reference alone
            native.pop("keep_reference_size", None)
        job = server.submit(native, "openai")
        return await respond(job, fmt, request)

    return api
