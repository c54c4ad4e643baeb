"""AUTOMATIC1111's web UI API (`/sdapi/v1`), as Open WebUI, SillyTavern, the Krita and Photoshop plugins and
countless scripts call it, with Forge's names for FLUX: `distilled_cfg_scale` is FLUX's guidance, `cfg_scale`
the true CFG scale (used only with a negative prompt). `<lora:name:scale>` in a prompt picks a LoRA, as in A1111.
Fields that steer A1111's own machinery (samplers, hires fix, inpainting fill) are accepted and left alone."""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Request
from PIL import ImageOps

from .. import __version__
from ..cli.recipe import infotext
from .engine import Job
from .settings import BadSettings

if TYPE_CHECKING:
    from .app import Server

LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([^:>]+))?(?::[^>]*)?>")
SAMPLERS = [{"name": "Euler", "aliases": ["euler", "k_euler"], "options": {}}]


def b64_image(value: Any, what: str) -> bytes:
    """A1111 sends images as base64, with or without a data: URL prefix."""
    if not isinstance(value, str):
        raise BadSettings(f"{what}: must be a base64 image, got {type(value).__name__}")
    text = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadSettings(f"{what}: not valid base64") from None


def lora_tags(prompt: str, names: set[str]) -> tuple[str, list[dict[str, Any]]]:
    """The prompt without its `<lora:name:scale>` tags, and the LoRAs they name."""
    loras = []
    for match in LORA_TAG.finditer(prompt):
        name, scale = match[1].strip(), match[2]
        if name not in names:
            raise BadSettings(f"prompt: no LoRA named {name!r} on this server (/sdapi/v1/loras lists them)")
        try:
            loras.append({"name": name, "scale": float(scale) if scale is not None else 1.0})
        except ValueError:
            raise BadSettings(f"prompt: the scale of <lora:{name}> must be a number, got {scale!r}") from None
    return " ".join(LORA_TAG.sub(" ", prompt).split()), loras


def native(body: Any, server: Server) -> dict[str, Any]:
    """Native settings from a txt2img/img2img body."""
    if not isinstance(body, dict):
        raise BadSettings("the body must be a JSON object")
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise BadSettings("prompt: must be text")
    prompt, loras = lora_tags(prompt, set(server.engine.loras))
    out: dict[str, Any] = {"prompt": prompt}
    negative = body.get("negative_prompt")
    if negative:
        out["negative_prompt"] = negative
        if body.get("cfg_scale") is not None:
            out["true_cfg"] = body["cfg_scale"]
    seed = body.get("seed", -1)
    if seed is not None and seed != -1:
        out["seed"] = seed
    for theirs, ours in (("steps", "steps"), ("distilled_cfg_scale", "guidance"), ("width", "width"),
                         ("height", "height")):
        if body.get(theirs) is not None:
            out[ours] = body[theirs]
    batch, iterations = body.get("batch_size", 1), body.get("n_iter", 1)
    for name, value in (("batch_size", batch), ("n_iter", iterations)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadSettings(f"{name}: must be a whole number of at least 1, got {value!r}")
    out["num_images"] = batch * iterations
    if loras or "<lora:" in body.get("prompt", ""):
        out["loras"] = loras
    return out


def info(job: Job, server: Server) -> dict[str, Any]:
    """The `info` A1111 returns (a JSON string in the response): the seeds and the parameters."""
    req = job.request
    seeds = [req.seed + k for k in range(req.num_images)]
    texts = [infotext(req, seed, server.model_name, server.engine.model_hash) for seed in seeds]
    return {"prompt": req.prompt, "all_prompts": [req.prompt] * len(seeds),
            "negative_prompt": req.negative_prompt or "", "all_negative_prompts": [req.negative_prompt or ""] *
            len(seeds), "seed": req.seed, "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds),
            "subseed_strength": 0, "width": req.width, "height": req.height, "sampler_name": "Euler",
            "cfg_scale": req.true_cfg, "distilled_cfg_scale": req.guidance, "steps": req.steps,
            "batch_size": req.num_images, "restore_faces": False, "sd_model_name": server.model_name,
            "sd_model_hash": server.engine.model_hash[:10], "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": req.strength, "extra_generation_params": {}, "index_of_first_image": 0,
            "infotexts": texts, "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S",
                                                                              time.localtime(job.created)),
            "clip_skip": 1, "is_using_inpainting_conditioning": job.request.mode in ("inpaint", "fill"),
            "version": f"rectiflux {__version__}"}


def parse_infotext(text: str) -> dict[str, Any]:
    """A1111's "parameters" text as its png-info returns it: Prompt, Negative prompt and each "Key: value"."""
    lines = text.strip().split("\n")
    out: dict[str, Any] = {}
    last = lines.pop() if lines and re.search(r"(^|, )Steps: ", lines[-1]) else ""
    negative = [i for i, line in enumerate(lines) if line.startswith("Negative prompt:")]
    if negative:
        out["Negative prompt"] = "\n".join(lines[negative[0]:]).removeprefix("Negative prompt:").strip()
        lines = lines[:negative[0]]
    out["Prompt"] = "\n".join(lines)
    for match in re.finditer(r"\s*([\w ]+):\s*(\"(?:\\.|[^\\\"])+\"|[^,]*)(?:,|$)", last):
        key, value = match[1].strip(), match[2].strip()
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        out[key] = value
        if key == "Size" and re.fullmatch(r"\d+x\d+", value):
            out["Size-1"], out["Size-2"] = value.split("x")
    return out


def router(server: Server) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])
    engine = server.engine

    def title() -> str:
        return f"{server.model_name} [{engine.model_hash[:10]}]"

    async def respond(job: Job, body: dict[str, Any]) -> dict[str, Any]:
        from .app import wait_finished

        await wait_finished(job)
        if job.state == "failed":
            raise HTTPException(500, job.error or "the job failed")
        # interrupted (cancelled) jobs return what they made, as A1111 does
        images = [base64.b64encode(server.image_path(name).read_bytes()).decode() for name in job.images]
        return {"images": images, "parameters": body, "info": json.dumps(info(job, server))}

    async def body_of(request: Request) -> dict[str, Any]:
        from .app import _json

        body = await _json(request)
        if not isinstance(body, dict):
            raise BadSettings("the body must be a JSON object")
        return body

    @api.post("/txt2img")
    async def txt2img(request: Request) -> dict[str, Any]:
        body = await body_of(request)
        return await respond(server.submit(native(body, server), "a1111"), body)

    @api.post("/img2img")
    async def img2img(request: Request) -> dict[str, Any]:
        """`init_images` (the first is used), `denoising_strength`, `mask` (white = repaint; `inpainting_mask_invert`
        1 swaps); on a Kontext model an edit, on a Fill model a fill, on a Canny/Depth model the control image."""
        body = await body_of(request)
        settings = native(body, server)
        sources = body.get("init_images")
        if not isinstance(sources, list) or not sources:
            raise BadSettings("init_images: give a list holding the base64 image")
        image = server.decode(b64_image(sources[0], "init_images"))
        kind = engine.pipe.kind
        if kind == "control":
            settings.update(mode="control", control_image=server.upload(image))
        else:
            settings["image"] = server.upload(image)
            settings["mode"] = {"kontext": "edit", "fill": "fill"}.get(kind, "img2img")
        if body.get("mask"):
            mask = server.decode(b64_image(body["mask"], "mask"), "mask").convert("L")
            if body.get("inpainting_mask_invert"):
                mask = ImageOps.invert(mask)
            if mask.size != image.size:
                raise BadSettings(f"mask: it is {mask.size[0]}x{mask.size[1]} but the image is "
                                  f"{image.size[0]}x{image.size[1]}")
            if kind not in ("flux", "fill"):
                raise BadSettings(f"mask: a {kind} model does not inpaint")
            settings["mask"] = server.upload(mask)
            settings["mode"] = "fill" if kind == "fill" else "inpaint"
        elif kind == "fill":
            raise BadSettings("mask: a FLUX.1-Fill model needs a mask")
        if body.get("denoising_strength") is not None and settings["mode"] in ("img2img", "inpaint"):
            settings["strength"] = body["denoising_strength"]
        return await respond(server.submit(settings, "a1111"), body)

    @api.get("/progress")
    async def progress(skip_current_image: bool = False) -> dict[str, Any]:
        job = engine.current
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": _state(None, engine.queue_length()),
                    "current_image": None, "textinfo": None}
        done = job.step / job.steps if job.steps else 0.0
        elapsed = time.time() - (job.started or time.time())
        eta = elapsed / done - elapsed if done > 0 else 0.0
        image = None
        if job.preview is not None and not skip_current_image:
            image = base64.b64encode(job.preview).decode()
        return {"progress": done, "eta_relative": eta, "state": _state(job, engine.queue_length()),
                "current_image": image, "textinfo": f"step {job.step} of {job.steps}"}

    @api.post("/interrupt")
    async def interrupt() -> None:
        """Stop the running job at its next step (the request that made it gets the images already done)."""
        job = engine.current
        if job is not None:
            engine.cancel(job.id)

    @api.post("/skip")
    async def skip() -> None:
        await interrupt()

    @api.post("/png-info")
    async def png_info(request: Request) -> dict[str, Any]:
        """The parameters text of a PNG (`{"image": base64}`): A1111's, Forge's or ours."""
        body = await body_of(request)
        if not body.get("image"):
            raise BadSettings("image: give the base64 PNG")
        image = server.decode(b64_image(body["image"], "image"))
        items = {k: v for k, v in image.info.items() if isinstance(v, str)}
        text = items.pop("parameters", "")
        return {"info": text, "items": items, "parameters": parse_infotext(text) if text else {}}

    @api.get("/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        return [{"title": title(), "model_name": server.model_name, "hash": engine.model_hash[:10],
                 "sha256": engine.model_hash, "filename": str(engine.pipe.source), "config": None}]

    @api.get("/options")
    async def options() -> dict[str, Any]:
        return {"sd_model_checkpoint": title(), "sd_checkpoint_hash": engine.model_hash, "samples_format": "png",
                "CLIP_stop_at_last_layers": 1, "forge_preset": "flux", "forge_additional_modules": []}

    @api.post("/options")
    async def set_options(request: Request) -> None:
        """Accepted for the clients that set the model first; only this server's own model can be chosen."""
        body = await body_of(request)
        chosen = body.get("sd_model_checkpoint")
        if chosen is not None and chosen not in (title(), server.model_name):
            raise BadSettings(f"sd_model_checkpoint: this server holds {title()} only, got {chosen!r}")

    @api.get("/samplers")
    async def samplers() -> list[dict[str, Any]]:
        return SAMPLERS

    @api.get("/schedulers")
    async def schedulers() -> list[dict[str, Any]]:
        return [{"name": "simple", "label": "Simple", "aliases": None, "default_rho": -1, "need_inner_model": False}]

    @api.get("/loras")
    async def loras() -> list[dict[str, Any]]:
        return [{"name": lora.name, "alias": lora.name, "path": lora.path, "metadata": {}}
                for lora in engine.loras.values()]

    return api


def _state(job: Job | None, waiting: int) -> dict[str, Any]:
    return {"skipped": False, "interrupted": bool(job and job.cancel_requested), "stopping_generation": False,
            "job": f"job {job.id}" if job else "", "job_count": waiting + (1 if job else 0),
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)) if job else "0",
            "job_no": 0, "sampling_step": job.step if job else 0, "sampling_steps": job.steps if job else 0}
