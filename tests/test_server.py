"""`rectiflux serve` on the embedded model: the native API, AUTOMATIC1111's and OpenAI's (with the real `openai`
client against a live server), each image the same pixels as `rectiflux generate` gives for the same settings."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from server_helpers import build_app, live_server
from test_cli import MODEL_DEFAULTS
from tiny_models import make_tiny_flux_folder

from rectiflux import cli
from rectiflux.cli.recipe import read_recipe
from rectiflux.server import preview
from rectiflux.server.history import History
from rectiflux.server.settings import BadSettings, parse_settings
from rectiflux.weights.checkpoint import save_state_dict

fastapi = pytest.importorskip("fastapi", reason="the serve extra is not installed")
from fastapi.testclient import TestClient  # noqa: E402

PROMPT = "a large red circle on the left on a white background"


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    # the weight-hash cache goes to a private folder, never the user's ~/.cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    g = torch.Generator().manual_seed(0)
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    save_state_dict({f"{key}.lora_down.weight": torch.randn(4, 128, generator=g) * 0.2,
                     f"{key}.lora_up.weight": torch.randn(384, 4, generator=g) * 0.2,
                     f"{key}.alpha": torch.tensor(4.0)}, folder / "style.safetensors")
    save_state_dict({"lora_unet_nowhere.lora_down.weight": torch.zeros(4, 128)}, folder / "broken.safetensors")
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory, loras):
    data = tmp_path_factory.mktemp("server-data")
    app, engine = build_app(data, lora_dir=loras)
    with TestClient(app) as client:
        yield client, engine
    engine.stop()


@pytest.fixture
def client(served):
    return served[0]


def wait(client, job_id, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish")


def pixels(data: bytes | str) -> np.ndarray:
    source = io.BytesIO(base64.b64decode(data) if isinstance(data, str) else data)
    with Image.open(source) as im:
        return np.asarray(im.convert("RGB")).copy()


def cli_pixels(tmp_path, *argv: str) -> list[np.ndarray]:
    out = tmp_path / f"cli-{len(list(tmp_path.iterdir()))}.png"
    assert cli.main([*argv, "-o", str(out)]) == 0
    files = [out] if out.exists() else sorted(tmp_path.glob(f"{out.stem}-*.png"))
    return [pixels(f.read_bytes()) for f in files]


def upload(client, image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    r = client.post("/api/uploads", files={"file": ("x.png", buffer.getvalue(), "image/png")})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def source_image(tmp_path) -> tuple[Image.Image, Image.Image]:
    """A source made by the model itself, and a mask whose left half is to be repainted."""
    (tmp_path / "src").mkdir()
    cli_pixels(tmp_path / "src", "generate", PROMPT, "--seed", "3")
    image = Image.open(next((tmp_path / "src").glob("*.png"))).convert("RGB")
    mask = Image.new("L", image.size)
    mask.paste(255, (0, 0, image.size[0] // 2, image.size[1]))
    return image, mask


# ----------------------------------------------------------------------------------------------------------------
# pure parts

def test_settings_are_checked_like_the_command_line():
    s = parse_settings({"prompt": "x", "strength": 0.5}, set())
    assert "strength" not in s and 0 <= s["seed"] < 2**32 and s["num_images"] == 1  # generate takes no strength
    cases = {"steps": (0, "at least 1"), "width": (8, "at least 16"), "seed": (-5, "from 0"),
             "num_images": (1000, "at most 10"), "guidance": ("3", "must be a number"),
             "max_sequence_length": (2.5, "whole number")}
    for name, (value, message) in cases.items():
        with pytest.raises(BadSettings, match=message):
            parse_settings({"prompt": "x", name: value}, set())
    with pytest.raises(BadSettings, match="whole number"):
        parse_settings({"prompt": "x", "steps": True}, set())
    with pytest.raises(BadSettings, match="unknown setting colour"):
        parse_settings({"prompt": "x", "colour": 1}, set())
    with pytest.raises(BadSettings, match="needs an uploaded image"):
        parse_settings({"prompt": "x", "mode": "img2img"}, set())
    with pytest.raises(BadSettings, match="not an upload id"):
        parse_settings({"prompt": "x", "mode": "img2img", "image": "../../etc/passwd"}, set())
    with pytest.raises(BadSettings, match="no LoRA named 'x'"):
        parse_settings({"prompt": "x", "loras": [{"name": "x"}]}, set())
    assert parse_settings({"prompt": "x", "loras": [{"name": "a", "scale": -0.5}]}, {"a"})["loras"] == \
        [{"name": "a", "scale": -0.5}]


def test_the_documented_job_schema_is_the_checked_one():
    from rectiflux.server.app import JobSettings
    from rectiflux.server.settings import FIELDS

    assert set(JobSettings.model_fields) == set(FIELDS)


def test_predicted_clean_latents_follow_the_straight_path():
    g = torch.Generator().manual_seed(0)
    clean, noise = torch.randn(1, 4, 64, generator=g), torch.randn(1, 4, 64, generator=g)
    at = lambda s: (1 - s) * clean + s * noise  # noqa: E731  rectified flow's path
    torch.testing.assert_close(preview.predicted_clean(at(0.5), at(0.8), 0.8, 0.5), clean)
    x = at(0.5)
    assert preview.predicted_clean(x, None, None, None) is x  # no step to read the velocity off: x itself


def test_preview_of_the_last_latents_looks_like_the_image(served):
    from rectiflux.sampling.latents import unpack_latents

    pipe, projection = served[1].pipe, served[1].projection
    latents = pipe(PROMPT, seed=1, output_type="latent").images
    image = np.asarray(pipe(PROMPT, seed=1).images[0], dtype=float)
    f = pipe.vae_scale_factor
    side, k = 64 // f, 64 // f // 8  # the latent grid, and its cells per eighth of the image
    shown = preview.latents_to_rgb(unpack_latents(latents, side, side)[0], projection).astype(float)
    pooled = image.reshape(side, f, side, f, 3).mean((1, 3))  # the image at the latent grid's resolution
    assert np.abs(shown - pooled).mean() < 0.5 * np.abs(pooled - pooled.mean((0, 1))).mean()
    left, right = shown[2 * k:6 * k, k:3 * k].mean((0, 1)), shown[:, 6 * k:].mean((0, 1))
    assert left[0] - left[1] > 60 and right.min() > 150  # a red disc on the left, white on the right


def test_history_marks_unfinished_jobs_interrupted(tmp_path):
    history = History(tmp_path / "h.sqlite3")
    for i, state in enumerate(("done", "running", "queued", "failed")):
        history.save({"id": f"{i:016x}", "origin": "api", "state": state, "settings": {"prompt": "p"},
                      "images": [f"{i:016x}-1.png"] if state == "done" else [], "error": None, "warnings": [],
                      "created": float(i), "started": None, "finished": None})
    history.close()
    history = History(tmp_path / "h.sqlite3")
    assert history.mark_interrupted(10.0) == 2
    assert [j["state"] for j in history.list(10)] == ["failed", "interrupted", "interrupted", "done"]
    assert history.get(f"{0:016x}")["images"] == [f"{0:016x}-1.png"]


# ----------------------------------------------------------------------------------------------------------------
# the native API

def test_native_job_events_image_and_recipe_match_the_cli(client, tmp_path):
    info = client.get("/api/info").json()
    assert info["name"] == "shapes" and info["modes"] == ["generate", "img2img", "inpaint"]
    assert info["defaults"]["width"] == 64 and [64, 64] in info["presets"]
    assert {lora["name"] for lora in info["loras"]} == {"style", "broken"}

    r = client.post("/api/jobs", json={"prompt": PROMPT, "seed": 7, "steps": 60, "loras": []})
    assert r.status_code == 202 and r.json()["state"] in ("queued", "running")
    job_id = r.json()["id"]
    events = []
    with client.stream("GET", f"/api/jobs/{job_id}/events") as stream:
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    states = [data["state"] for name, data in events if name == "job"]
    assert states[-1] == "done" and "running" in states
    steps = [data["step"] for name, data in events if name == "job"]
    assert steps == sorted(steps) and steps[-1] == 60
    previews = [data for name, data in events if name == "preview"]
    assert previews and previews[0]["image"].startswith("data:image/png;base64,")
    assert pixels(previews[-1]["image"].split(",", 1)[1]).shape == (8, 8, 3)  # the latent grid

    job = client.get(f"/api/jobs/{job_id}").json()
    assert job["progress"] == 1.0 and job["settings"]["seed"] == 7 and len(job["images"]) == 1
    png = client.get(job["images"][0]["url"])
    assert png.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(pixels(png.content), cli_pixels(tmp_path, "generate", PROMPT, "--seed", "7",
                                                                   "--steps", "60")[0])
    (tmp_path / "got.png").write_bytes(png.content)
    recipe = read_recipe(tmp_path / "got.png")
    assert (recipe["prompt"], recipe["seed"], recipe["steps"]) == (PROMPT, 7, 60)
    info = client.post("/api/png-info", files={"file": ("a.png", png.content, "image/png")}).json()
    assert info["settings"]["seed"] == 7 and info["settings"]["prompt"] == PROMPT
    assert job_id in [j["id"] for j in client.get("/api/jobs").json()["jobs"]]


def test_img2img_and_inpaint_through_uploads_match_the_cli(client, tmp_path):
    image, mask = source_image(tmp_path)
    image.save(tmp_path / "image.png")
    mask.save(tmp_path / "mask.png")
    ids = {"image": upload(client, image), "mask": upload(client, mask)}
    assert client.get(f"/api/uploads/{ids['mask']}").content[:8] == b"\x89PNG\r\n\x1a\n"
    cases = [({"mode": "img2img", "image": ids["image"], "strength": 0.6},
              ["img2img", "--image", str(tmp_path / "image.png"), "--strength", "0.6"]),
             ({"mode": "inpaint", "image": ids["image"], "mask": ids["mask"]},
              ["inpaint", "--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png")])]
    for settings, argv in cases:
        r = client.post("/api/jobs", json={"prompt": "a small blue square on the right on a white background",
                                           "seed": 4, "loras": [], **settings})
        assert r.status_code == 202, r.text
        job = wait(client, r.json()["id"])
        assert job["state"] == "done", job["error"]
        png = client.get(job["images"][0]["url"]).content
        again = client.post("/api/png-info", files={"file": ("a.png", png, "image/png")}).json()["settings"]
        assert {k: again.get(k) for k in settings} == settings  # the inputs come back as upload ids
        got = pixels(png)
        want = cli_pixels(tmp_path, argv[0], "a small blue square on the right on a white background", *argv[1:],
                          "--seed", "4")[0]
        np.testing.assert_array_equal(got, want)


def test_cancel_a_queued_and_a_running_job(client):
    first = client.post("/api/jobs", json={"prompt": PROMPT, "steps": 3000, "loras": []}).json()
    second = client.post("/api/jobs", json={"prompt": PROMPT, "loras": []}).json()
    assert second["position"] >= 1
    cancelled = client.post(f"/api/jobs/{second['id']}/cancel").json()
    assert cancelled["state"] == "cancelled"
    deadline = time.monotonic() + 30
    while client.get(f"/api/jobs/{first['id']}").json()["step"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    client.post(f"/api/jobs/{first['id']}/cancel")
    job = wait(client, first["id"])
    assert job["state"] == "cancelled" and job["images"] == [] and 0 < job["step"] < 3000
    assert client.post("/api/jobs/0123456789abcdef/cancel").status_code == 404


def test_loras_by_name_and_a_refused_one_leaves_the_model_as_it_was(client, tmp_path, loras):
    def image_of(**settings):
        r = client.post("/api/jobs", json={"prompt": PROMPT, "seed": 9, **settings})
        assert r.status_code == 202, r.text
        return wait(client, r.json()["id"])

    plain = cli_pixels(tmp_path, "generate", PROMPT, "--seed", "9")[0]
    styled = cli_pixels(tmp_path, "generate", PROMPT, "--seed", "9", "--lora",
                        f"{loras / 'style.safetensors'}:0.8")[0]
    assert not np.array_equal(plain, styled)
    job = image_of(loras=[{"name": "style", "scale": 0.8}])
    np.testing.assert_array_equal(pixels(client.get(job["images"][0]["url"]).content), styled)
    broken = image_of(loras=[{"name": "broken", "scale": 1.0}])
    assert broken["state"] == "failed" and "lora_unet_nowhere" in broken["error"]
    job = image_of(loras=[])
    np.testing.assert_array_equal(pixels(client.get(job["images"][0]["url"]).content), plain)
    # AUTOMATIC1111's prompt syntax picks the same LoRA
    r = client.post("/sdapi/v1/txt2img", json={"prompt": f"{PROMPT} <lora:style:0.8>", "seed": 9})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(pixels(r.json()["images"][0]), styled)
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "x <lora:nope:1>"}).status_code == 400


def test_bad_requests_get_one_line(client):
    cases = [("/api/jobs", {"prompt": PROMPT, "width": 100000}, 400, "width must be from 16 to 8192"),
             ("/api/jobs", {"prompt": " ".join(["circle"] * 200)}, 400, "max_sequence_length"),
             ("/api/jobs", {"prompt": PROMPT, "mode": "fill", "image": "0" * 64 + ".png",
                            "mask": "0" * 64 + ".png"}, 400, "no upload"),
             ("/api/jobs", {"prompt": PROMPT, "mode": "edit", "image": "0" * 64 + ".png"}, 400, "no upload"),
             ("/sdapi/v1/txt2img", {"prompt": PROMPT, "batch_size": 0}, 400, "batch_size"),
             ("/sdapi/v1/img2img", {"prompt": PROMPT, "init_images": ["not base64!"]}, 400, "base64"),
             ("/sdapi/v1/options", {"sd_model_checkpoint": "other"}, 400, "holds shapes")]
    for route, body, status, message in cases:
        r = client.post(route, json=body)
        assert r.status_code == status and message in r.json()["detail"], (route, body, r.text)
        assert "\n" not in r.json()["detail"]
    r = client.post("/api/jobs", json={"prompt": PROMPT, "mode": "edit", "image": upload(client, Image.new(
        "RGB", (64, 64)))})
    assert r.status_code == 400 and "FLUX.1-Kontext" in r.json()["detail"]
    assert client.get("/api/jobs/nothing").status_code == 404
    assert client.get("/api/images/..%2Fhistory.sqlite3").status_code == 404


# ----------------------------------------------------------------------------------------------------------------
# AUTOMATIC1111

def test_a1111_txt2img_info_png_info_and_model_routes(client, tmp_path):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "negative_prompt": "", "seed": 11, "steps": 8,
                                               "batch_size": 2, "cfg_scale": 7, "distilled_cfg_scale": 4.0,
                                               "sampler_name": "DPM++ 2M", "width": 64, "height": 64,
                                               "enable_hr": False, "restore_faces": False})
    assert r.status_code == 200, r.text
    body = r.json()
    info = json.loads(body["info"])
    assert info["all_seeds"] == [11, 12] and info["distilled_cfg_scale"] == 4.0 and info["cfg_scale"] == 1.0
    want = cli_pixels(tmp_path, "generate", PROMPT, "--seed", "11", "--num-images", "2", "--guidance", "4.0")
    for got, expected in zip(body["images"], want, strict=True):
        np.testing.assert_array_equal(pixels(got), expected)
    assert "Seed: 11" in info["infotexts"][0] and "Distilled CFG Scale: 4.0" in info["infotexts"][0]

    read = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + body["images"][1]}).json()
    assert read["info"].startswith(PROMPT) and read["parameters"]["Seed"] == "12"
    assert read["parameters"]["Prompt"] == PROMPT and read["parameters"]["Size-1"] == "64"
    assert read["items"]["rectiflux_version"]

    models = client.get("/sdapi/v1/sd-models").json()
    assert models[0]["model_name"] == "shapes" and len(models[0]["sha256"]) == 64
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == models[0]["title"]
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": models[0]["title"]}).status_code == 200
    assert client.get("/sdapi/v1/samplers").json()[0]["name"] == "Euler"
    assert {lora["name"] for lora in client.get("/sdapi/v1/loras").json()} == {"style", "broken"}


def test_a1111_img2img_and_inpaint_match_the_cli(client, tmp_path):
    image, mask = source_image(tmp_path)
    image.save(tmp_path / "image.png")
    mask.save(tmp_path / "mask.png")

    def b64(im):
        buffer = io.BytesIO()
        im.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    prompt = "a small green square on the left on a white background"
    r = client.post("/sdapi/v1/img2img", json={"prompt": prompt, "seed": 5, "init_images": [b64(image)],
                                               "denoising_strength": 0.8})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(pixels(r.json()["images"][0]), cli_pixels(
        tmp_path, "img2img", prompt, "--image", str(tmp_path / "image.png"), "--strength", "0.8", "--seed", "5")[0])
    r = client.post("/sdapi/v1/img2img", json={"prompt": prompt, "seed": 5, "init_images": [b64(image)],
                                               "mask": b64(mask), "inpainting_fill": 1, "mask_blur": 4,
                                               "denoising_strength": 0.9})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(pixels(r.json()["images"][0]), cli_pixels(
        tmp_path, "inpaint", prompt, "--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"),
        "--strength", "0.9", "--seed", "5")[0])


def test_a1111_progress_and_interrupt(client):
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=client.post(
        "/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 3000})))
    thread.start()
    deadline = time.monotonic() + 30
    while True:
        progress = client.get("/sdapi/v1/progress").json()
        if progress["progress"] > 0 and progress["current_image"]:
            break
        assert time.monotonic() < deadline, progress
        time.sleep(0.02)
    assert progress["state"]["sampling_steps"] == 3000 and progress["state"]["job_count"] >= 1
    assert pixels(progress["current_image"]).shape == (8, 8, 3)
    assert client.post("/sdapi/v1/interrupt").status_code == 200
    thread.join(30)
    assert result["r"].status_code == 200 and result["r"].json()["images"] == []
    assert client.get("/sdapi/v1/progress").json()["progress"] == 0.0


# ----------------------------------------------------------------------------------------------------------------
# OpenAI, with the real client against a live server

def test_openai_client_generations_edits_and_errors(tmp_path, loras):
    openai = pytest.importorskip("openai")
    image, mask = source_image(tmp_path)
    image.save(tmp_path / "image.png")
    mask.save(tmp_path / "mask.png")
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.eval(mask, lambda v: 0 if v else 255))  # OpenAI: transparent = repaint
    rgba.save(tmp_path / "openai-mask.png")
    with live_server(tmp_path / "data", token="sesame") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0)
        assert [m.id for m in client.models.list()] == ["shapes"]
        result = client.images.generate(model="shapes", prompt=PROMPT, n=2, size="64x64",
                                        response_format="b64_json", extra_body={"seed": 21, "steps": 8})
        want = cli_pixels(tmp_path, "generate", PROMPT, "--seed", "21", "--num-images", "2")
        for item, expected in zip(result.data, want, strict=True):
            np.testing.assert_array_equal(pixels(item.b64_json), expected)
        linked = client.images.generate(prompt=PROMPT, response_format="url", extra_body={"seed": 21})
        import httpx

        fetched = httpx.get(linked.data[0].url, headers={"Authorization": "Bearer sesame"})
        np.testing.assert_array_equal(pixels(fetched.content), want[0])

        prompt = "a small blue square on the right on a white background"
        with open(tmp_path / "image.png", "rb") as im, open(tmp_path / "openai-mask.png", "rb") as m:
            edited = client.images.edit(image=im, mask=m, prompt=prompt, extra_body={"seed": 2})
        np.testing.assert_array_equal(pixels(edited.data[0].b64_json), cli_pixels(
            tmp_path, "inpaint", prompt, "--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"),
            "--seed", "2")[0])
        with open(tmp_path / "image.png", "rb") as im:
            reworked = client.images.edit(image=im, prompt=prompt, extra_body={"seed": 2, "strength": 0.5})
        np.testing.assert_array_equal(pixels(reworked.data[0].b64_json), cli_pixels(
            tmp_path, "img2img", prompt, "--image", str(tmp_path / "image.png"), "--strength", "0.5",
            "--seed", "2")[0])

        with pytest.raises(openai.BadRequestError, match="WIDTHxHEIGHT"):
            client.images.generate(prompt=PROMPT, size="big")
        with pytest.raises(openai.BadRequestError, match="at most 10 images"):
            client.images.generate(prompt=PROMPT, n=1000)
        with open(tmp_path / "image.png", "rb") as im, open(tmp_path / "mask.png", "rb") as m:
            with pytest.raises(openai.BadRequestError, match="alpha channel"):
                client.images.edit(image=im, mask=m, prompt=prompt)
        with pytest.raises(openai.AuthenticationError, match="wrong token"):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).images.generate(prompt=PROMPT)


def test_variants_through_openai_edits_match_the_cli(tmp_path):
    """Without a mask a Kontext model edits; a Fill model fills the mask's transparent part."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    photo.save(tmp_path / "photo.png")
    mask = Image.new("L", (32, 32))
    mask.paste(255, (8, 8, 24, 24))
    mask.save(tmp_path / "mask.png")
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.eval(mask, lambda v: 0 if v else 255))
    buffers = {}
    for name, im in (("photo", photo), ("mask", rgba)):
        buffers[name] = io.BytesIO()
        im.save(buffers[name], format="PNG")
    for variant, argv, files in (
            ("kontext", ["edit", "make it blue", "--image", str(tmp_path / "photo.png"), "--keep-reference-size"],
             ("photo",)),
            ("fill", ["fill", "make it blue", "--image", str(tmp_path / "photo.png"), "--mask",
                      str(tmp_path / "mask.png")], ("photo", "mask"))):
        folder = make_tiny_flux_folder(tmp_path / variant, variant=variant)
        (folder / "rectiflux.json").write_text(json.dumps(MODEL_DEFAULTS))
        app, engine = build_app(tmp_path / f"data-{variant}", model=folder)
        try:
            with TestClient(app) as client:
                upload_files = {"image": ("photo.png", buffers["photo"].getvalue(), "image/png")}
                if "mask" in files:
                    upload_files["mask"] = ("mask.png", buffers["mask"].getvalue(), "image/png")
                form = {"prompt": "make it blue", "seed": "6", "keep_reference_size": "true"}
                r = client.post("/v1/images/edits", data=form, files=upload_files)
                assert r.status_code == 200, r.text
                want = cli_pixels(tmp_path, *argv, "--model", str(folder), "--seed", "6")[0]
                np.testing.assert_array_equal(pixels(r.json()["data"][0]["b64_json"]), want)
                assert client.get("/api/info").json()["modes"] == [{"kontext": "edit", "fill": "fill"}[variant]]
        finally:
            engine.stop()


def test_api_docs_page_works_offline(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower()
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/api/jobs", "/v1/images/generations", "/sdapi/v1/txt2img"} <= set(schema["paths"])
