"""The page `rectiflux serve` serves, driven in a real browser (Playwright and Chromium) against a real server with
the embedded model: generating with progress and previews, cancelling, painting an inpainting mask, reusing a
job's settings, restoring a PNG's recipe by drag and drop, the phone layout and the token."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sync_api = pytest.importorskip("playwright.sync_api", reason="the page tests need Playwright (pip install playwright)")

CHROMIUM = os.environ.get("RECTIFLUX_CHROMIUM") or next(
    (path for name in ("chromium", "chromium-browser", "google-chrome", "chrome") if (path := shutil.which(name))),
    None)
if not CHROMIUM or not Path(CHROMIUM).exists():
    pytest.skip("no Chromium to drive (install chromium or set RECTIFLUX_CHROMIUM to a Chrome/Chromium binary)",
                allow_module_level=True)

from server_helpers import live_server  # noqa: E402  (after the skips: it needs the server's packages)

expect = sync_api.expect
PROMPT = "a large red circle on the left on a white background"
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "server-page.png"
LAPTOP = {"width": 1366, "height": 768}
PHONE = {"width": 390, "height": 844}
UPLOAD_ID = re.compile(r"[0-9a-f]{64}\.png")
TIMEOUT = 20_000  # ms: the embedded model makes an image in about 0.1 s; this is for a loaded machine

# Records every value the progress bar takes and every source the preview shows, from before the click on.
WATCH = """() => {
  window.__seen = {progress: [], previews: []};
  const progress = document.getElementById('progress');
  const preview = document.getElementById('preview');
  new MutationObserver(() => window.__seen.progress.push(Number(progress.value)))
    .observe(progress, {attributes: true, attributeFilter: ['value']});
  new MutationObserver(() => window.__seen.previews.push(preview.getAttribute('src') || ''))
    .observe(preview, {attributes: true, attributeFilter: ['src']});
}"""

# The RGBA pixels an <img> shows, read back through a canvas.
PIXELS = """img => {
  const c = document.createElement('canvas');
  c.width = img.naturalWidth;
  c.height = img.naturalHeight;
  const ctx = c.getContext('2d');
  ctx.drawImage(img, 0, 0);
  return {width: c.width, height: c.height, data: Array.from(ctx.getImageData(0, 0, c.width, c.height).data)};
}"""

# Which pixels of the mask canvas hold paint (alpha >= 128), row by row.
PAINTED = """() => {
  const c = document.getElementById('mask-canvas');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const out = [];
  for (let i = 3; i < d.length; i += 4) out.push(d[i] >= 128 ? 1 : 0);
  return {width: c.width, height: c.height, data: out};
}"""

# Drops a file (its bytes in base64) on an element through a real DataTransfer, as a file manager does.
DROP = """([selector, b64, name]) => {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const transfer = new DataTransfer();
  transfer.items.add(new File([bytes], name, {type: 'image/png'}));
  const target = document.querySelector(selector);
  for (const type of ['dragenter', 'dragover', 'drop']) {
    target.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: transfer}));
  }
  return getComputedStyle(document.getElementById('drop-overlay')).display;
}"""


# ------------------------------------------------------------------------------------------------------------------
# helpers

def http(base: str, path: str, method: str = "GET", body: dict | None = None, token: str | None = None):
    """(status, bytes) of one request to the server."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as res:
            return res.status, res.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def get_json(base: str, path: str, **kwargs) -> dict:
    status, data = http(base, path, **kwargs)
    assert status < 300, (path, status, data)
    return json.loads(data)


def wait_job(base: str, job_id: str, token: str | None = None, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = get_json(base, f"/api/jobs/{job_id}", token=token)
        if job["state"] in ("done", "failed", "cancelled", "interrupted"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['state']}"
        time.sleep(0.05)


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGBA"))


def shown_pixels(locator) -> np.ndarray:
    got = locator.evaluate(PIXELS)
    return np.asarray(got["data"], dtype=np.uint8).reshape(got["height"], got["width"], 4)


def is_job_post(response_or_request) -> bool:
    request = getattr(response_or_request, "request", response_or_request)
    return request.method == "POST" and request.url.endswith("/api/jobs")


def submit(page):
    """Click Generate; the job the server answered with."""
    try:
        with page.expect_response(is_job_post) as answer:
            page.click("#generate")
    except sync_api.TimeoutError:
        error = page.locator("#error-text").text_content() if page.locator("#error").is_visible() else "none"
        raise AssertionError(f"Generate posted no job; the page's error line: {error}") from None
    assert answer.value.status == 202, answer.value.text()
    return answer.value.json()


def set_range(page, selector: str, value) -> None:
    page.eval_on_selector(selector, "(el, v) => { el.value = v; el.dispatchEvent(new Event('input', "
                          "{bubbles: true})); }", str(value))


def painted(page) -> np.ndarray:
    got = page.evaluate(PAINTED)
    return np.asarray(got["data"], dtype=bool).reshape(got["height"], got["width"])


def stroke(page, points) -> None:
    """Press the mouse at the first point, drag through the others, release."""
    page.mouse.move(*points[0])
    page.mouse.down()
    for point in points[1:]:
        page.mouse.move(*point, steps=4)
    page.mouse.up()


# ------------------------------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


def save_lora(path: Path, seed: int) -> None:
    """A small peft LoRA on the embedded model's first attention output (it changes the image, a little)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    key = "transformer.transformer_blocks.0.attn.to_out.0"
    save_file({f"{key}.lora_A.weight": torch.randn(4, 128, generator=g) * 0.1,
               f"{key}.lora_B.weight": torch.randn(128, 4, generator=g) * 0.1}, str(path))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server-page")
    (root / "loras").mkdir()
    for seed, name in enumerate(("detail", "style")):
        save_lora(root / "loras" / f"{name}.safetensors", seed)
    # one job waits at most: the error test fills the queue with two
    with live_server(root / "data", max_queue=1, lora_dir=root / "loras") as url:
        yield url


def open_page(browser, url: str, viewport=LAPTOP, ready: bool = True):
    context = browser.new_context(viewport=viewport, color_scheme="dark")
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(url)
    if ready:
        page.wait_for_selector("body[data-ready]")
    return page


@pytest.fixture
def page(browser, server):
    page = open_page(browser, server)
    yield page
    errors = page.errors
    page.context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


# ------------------------------------------------------------------------------------------------------------------
# the tests

def test_generate_shows_progress_preview_result_and_history(page, server, tmp_path):
    info = get_json(server, "/api/info")
    assert page.locator("#model-name").inner_text().startswith(info["name"])
    assert page.input_value("#steps") == str(info["defaults"]["steps"])  # the form starts at the model's defaults
    assert page.input_value("#width") == str(info["defaults"]["width"])
    assert page.locator("#mode-inpaint").is_visible() and page.locator("#mode-edit").is_hidden()  # modes from info

    rows = page.locator("#lora-list .lora")  # the LoRA picker: one row per LoRA on offer, unchecked (not active)
    assert [r.get_attribute("data-name") for r in rows.all()] == [lora["name"] for lora in info["loras"]]
    assert not any(box.is_checked() for box in page.locator("#lora-list .lora-on").all())

    page.fill("#prompt", PROMPT)
    page.fill("#seed", "1234")
    page.fill("#steps", "80")  # long enough to see it move: about a second
    page.fill("#num-images", "2")
    page.locator("#lora-list .lora[data-name='style'] .lora-on").check()
    page.locator("#lora-list .lora[data-name='style'] .lora-scale").fill("0.5")
    page.evaluate(WATCH)
    job = submit(page)
    settings = job["settings"]
    assert settings["seed"] == 1234 and settings["steps"] == 80 and settings["num_images"] == 2
    assert settings["loras"] == [{"name": "style", "scale": 0.5}]
    expect(page.locator("#status")).to_have_attribute("data-state", "done")
    expect(page.locator("#results img")).to_have_count(2)

    seen = page.evaluate("window.__seen")
    assert any(0 < p < 1 for p in seen["progress"]), seen["progress"]  # it moved through the steps
    assert page.eval_on_selector("#progress", "el => el.value") == 1
    assert any(src.startswith("data:image/png;base64,") for src in seen["previews"]), "no live preview was shown"
    assert page.locator("#preview").is_hidden()  # the results took its place

    final = get_json(server, f"/api/jobs/{job['id']}")
    assert final["state"] == "done" and len(final["images"]) == 2
    for k, image in enumerate(final["images"]):
        shown = page.locator(f"#results img[data-name='{image['name']}']")
        expect(shown).to_have_attribute("title", f"seed {1234 + k}")
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=shown.element_handle())
        status, data = http(server, image["url"])
        assert status == 200
        assert np.array_equal(shown_pixels(shown), png_pixels(data)), "the page shows other pixels than the API's"

    card = page.locator(f"#gallery .job[data-job='{job['id']}']")
    expect(card).to_be_visible()
    expect(card.locator(".thumb img")).to_have_count(2)
    expect(card.locator(".recipe-prompt")).to_have_text(PROMPT)
    expect(card.locator(".recipe").first).to_contain_text("seed 1234")
    expect(card.locator(".recipe").first).to_contain_text("80 steps")
    link = card.locator("a.download").first
    expect(link).to_have_attribute("download", final["images"][0]["name"])
    expect(link).to_have_attribute("href", final["images"][0]["url"])

    # the laptop layout: the form on the left, the images on the right, no sideways scrolling
    form, stage = page.locator("#form").bounding_box(), page.locator(".stage").bounding_box()
    assert form["x"] + form["width"] <= stage["x"] and abs(form["y"] - stage["y"]) < 2
    assert page.evaluate("document.scrollingElement.scrollWidth") <= LAPTOP["width"]
    page.wait_for_function("() => [...document.images].every(i => i.complete)")
    page.wait_for_timeout(300)  # the progress bar's last transition
    SCREENSHOT.parent.mkdir(exist_ok=True)
    # docs/ keeps the page's picture; a run rewrites it only when asked, so that tests leave the tree as it was
    shot = SCREENSHOT if os.environ.get("RECTIFLUX_UPDATE_SCREENSHOT") == "1" else tmp_path / SCREENSHOT.name
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000


def test_cancel_stops_a_long_job_without_an_image(page, server):
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "400")  # several seconds
    job = submit(page)
    page.wait_for_function("() => document.getElementById('progress').value > 0")
    expect(page.locator("#cancel")).to_be_enabled()
    with page.expect_response(lambda r: r.url.endswith(f"/api/jobs/{job['id']}/cancel")) as answer:
        page.click("#cancel")
    assert answer.value.status == 200
    expect(page.locator("#status")).to_have_attribute("data-state", "cancelled")
    expect(page.locator("#cancel")).to_be_disabled()
    final = wait_job(server, job["id"])
    assert final["state"] == "cancelled" and final["images"] == []
    if final["steps"]:  # still in the server's memory: it stopped before the last step
        assert final["step"] < final["steps"]
    expect(page.locator("#results img")).to_have_count(0)
    expect(page.locator(f"#gallery .job[data-job='{job['id']}'].state-cancelled")).to_be_visible()


def test_inpaint_mask_painted_with_brush_eraser_and_clear(page, server, tmp_path):
    source = Image.new("RGB", (64, 64), "white")
    source.paste((0, 0, 255), (8, 8, 40, 40))
    source.save(tmp_path / "source.png")

    page.click("#mode-inpaint")
    expect(page.locator("#image-input")).to_be_visible()
    expect(page.locator("#mask-tools")).to_be_hidden()  # nothing to paint on yet
    with page.expect_response(lambda r: r.url.endswith("/api/uploads")) as answer:
        page.set_input_files("#image-input", str(tmp_path / "source.png"))
    upload = answer.value.json()
    assert answer.value.status == 201 and upload["width"] == 64
    expect(page.locator("#mask-canvas")).to_be_visible()
    expect(page.locator("#strength")).to_be_visible()
    assert page.eval_on_selector("#mask-canvas", "c => [c.width, c.height]") == [64, 64]

    set_range(page, "#brush-size", 30)
    radius = 15

    def paint_left_half():
        box = page.locator("#mask-canvas").bounding_box()  # where it is now: an error line moves it down
        left, top, h = box["x"], box["y"], box["height"]
        end = left + box["width"] / 2 - radius - 3  # the brush's edge stays left of the middle
        points = []
        for i, y in enumerate(np.arange(top + 2, top + h, radius)):
            points += [(left + 2, y), (end, y)] if i % 2 == 0 else [(end, y), (left + 2, y)]
        points += [(left + 2, top + h - 2), (end, top + h - 2)]
        stroke(page, points)
        mask = painted(page)
        assert mask[:, :28].all() and not mask[:, 34:].any(), "the brush did not paint exactly the left half"

    page.click("#brush")
    paint_left_half()

    page.click("#eraser")
    expect(page.locator("#eraser")).to_have_attribute("aria-pressed", "true")
    box = page.locator("#mask-canvas").bounding_box()
    x = box["x"] + box["width"] / 4
    stroke(page, [(x, box["y"] + 2), (x, box["y"] + box["height"] - 2)])
    mask = painted(page)
    assert not mask[:, 16].any() and mask[:, 4].all(), "the eraser did not remove the paint under its stroke"

    page.click("#clear-mask")
    assert not painted(page).any()
    page.fill("#prompt", "a large yellow triangle in the center on a black background")
    page.click("#generate")  # an empty mask is refused by the page, in one line
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error-text")).to_contain_text("mask")

    page.click("#brush")
    paint_left_half()
    page.fill("#seed", "5")
    job = submit(page)
    expect(page.locator("#error")).to_be_hidden()
    settings = job["settings"]
    assert settings["mode"] == "inpaint" and settings["image"] == upload["id"]
    assert UPLOAD_ID.fullmatch(settings["mask"]) and settings["mask"] != upload["id"]
    expect(page.locator("#status")).to_have_attribute("data-state", "done")
    assert wait_job(server, job["id"])["state"] == "done"

    status, data = http(server, f"/api/uploads/{settings['mask']}")
    assert status == 200
    sent = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    assert sent.shape == (64, 64)
    assert set(np.unique(sent)) <= {0, 255}, "the mask is not black and white"
    assert (sent[:, :28] == 255).all() and (sent[:, 34:] == 0).all(), "the mask is not white where painted"


def test_use_these_settings_again(page, server):
    page.fill("#prompt", "a small blue square at the top on a black background")
    page.fill("#seed", "77")
    page.fill("#steps", "6")
    page.select_option("#size-preset", "custom")
    page.fill("#width", "96")
    page.fill("#height", "48")
    page.click("#negative-box summary")
    page.fill("#negative-prompt", "a green circle")
    page.fill("#true-cfg", "2")
    detail = page.locator("#lora-list .lora[data-name='detail']")
    style = page.locator("#lora-list .lora[data-name='style']")
    detail.locator(".lora-on").check()
    detail.locator(".lora-scale").fill("0.75")
    job = submit(page)
    expect(page.locator("#status")).to_have_attribute("data-state", "done")
    settings = job["settings"]
    assert settings["width"] == 96 and settings["height"] == 48 and settings["true_cfg"] == 2
    assert settings["negative_prompt"] == "a green circle" and settings["loras"] == [{"name": "detail", "scale": 0.75}]

    page.fill("#prompt", "something else")
    page.fill("#seed", "")
    page.fill("#steps", "3")
    page.select_option("#size-preset", "64,64")
    assert page.input_value("#width") == "64"
    page.fill("#negative-prompt", "")
    page.fill("#true-cfg", "1")
    detail.locator(".lora-on").uncheck()
    style.locator(".lora-on").check()

    page.locator(f"#gallery .job[data-job='{job['id']}'] .reuse").click()
    expect(page.locator("#prompt")).to_have_value("a small blue square at the top on a black background")
    expect(page.locator("#seed")).to_have_value("77")
    expect(page.locator("#steps")).to_have_value("6")
    expect(page.locator("#width")).to_have_value("96")
    expect(page.locator("#height")).to_have_value("48")
    expect(page.locator("#size-preset")).to_have_value("custom")
    expect(page.locator("#mode-generate")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#negative-prompt")).to_have_value("a green circle")
    expect(page.locator("#true-cfg")).to_have_value("2")
    expect(detail.locator(".lora-on")).to_be_checked()
    expect(detail.locator(".lora-scale")).to_have_value("0.75")
    expect(style.locator(".lora-on")).not_to_be_checked()


def test_dropping_a_png_restores_its_recipe(page, server):
    seed = 2**60 + 3  # more than a JavaScript number holds exactly
    settings = {"prompt": "a large green triangle at the bottom on a white background", "seed": seed, "steps": 9,
                "guidance": 4.5}
    job = get_json(server, "/api/jobs", method="POST", body=settings)
    job = wait_job(server, job["id"])
    assert job["state"] == "done", job
    status, png = http(server, job["images"][0]["url"])
    assert status == 200

    page.fill("#prompt", "not this")
    page.fill("#steps", "20")
    with page.expect_response(lambda r: r.url.endswith("/api/png-info")) as answer:
        overlay = page.evaluate(DROP, ["#viewer", base64.b64encode(png).decode(), "dropped.png"])
    assert answer.value.status == 200
    assert overlay == "none"  # the drop hid the drop hint again
    expect(page.locator("#prompt")).to_have_value(settings["prompt"])
    expect(page.locator("#seed")).to_have_value(str(seed))
    expect(page.locator("#steps")).to_have_value("9")
    expect(page.locator("#guidance")).to_have_value("4.5")
    expect(page.locator("#error")).to_be_hidden()
    again = submit(page)  # the same recipe again, the seed exact
    assert again["settings"]["seed"] == seed and again["settings"]["prompt"] == settings["prompt"]
    expect(page.locator("#status")).to_have_attribute("data-state", "done")
    expect(page.locator("#results img").first).to_have_attribute("title", f"seed {seed}")
    status, png_again = http(server, wait_job(server, again["id"])["images"][0]["url"])
    assert np.array_equal(png_pixels(png_again), png_pixels(png))

    # a PNG without a recipe: the server's refusal is shown, in one line
    plain = io.BytesIO()
    Image.new("RGB", (8, 8)).save(plain, format="PNG")
    page.evaluate(DROP, ["body", base64.b64encode(plain.getvalue()).decode(), "plain.png"])
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error-text")).to_contain_text("400")
    assert page.eval_on_selector("#error-text", "el => el.scrollHeight <= el.clientHeight + 2")  # one line


def test_api_errors_are_shown(page, server):
    page.fill("#prompt", PROMPT)
    page.select_option("#size-preset", "custom")
    page.fill("#width", "100000")
    with page.expect_response(is_job_post) as answer:
        page.click("#generate")
    assert answer.value.status in (400, 422)
    detail = answer.value.json()["detail"]
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error-text")).to_contain_text(detail)
    page.click("#error-close")
    expect(page.locator("#error")).to_be_hidden()

    # the queue full (this server lets one job wait): 429, shown with its detail
    page.select_option("#size-preset", "64,64")
    long = {"prompt": PROMPT, "steps": 400}
    running = get_json(server, "/api/jobs", method="POST", body=long)
    deadline = time.monotonic() + 10
    while get_json(server, f"/api/jobs/{running['id']}")["state"] == "queued":  # out of the queue, running
        assert time.monotonic() < deadline
        time.sleep(0.02)
    waiting = get_json(server, "/api/jobs", method="POST", body=long)
    try:
        with page.expect_response(is_job_post) as answer:
            page.click("#generate")
        assert answer.value.status == 429
        expect(page.locator("#error-text")).to_contain_text("429")
        expect(page.locator("#error-text")).to_contain_text(answer.value.json()["detail"])
    finally:
        for job in (waiting, running):
            http(server, f"/api/jobs/{job['id']}/cancel", method="POST")
        for job in (waiting, running):
            assert wait_job(server, job["id"])["state"] == "cancelled"


def test_mode_tabs_follow_the_models_modes(browser, server, tmp_path):
    """A Kontext, Fill or Control model's modes (the route answers as such a server would): only their tabs, each
    sending its own inputs; the embedded model cannot run them, and the server's refusal is shown."""
    Image.new("RGB", (64, 64), "gray").save(tmp_path / "reference.png")
    info = get_json(server, "/api/info")
    page = open_page(browser, server, ready=False)
    try:
        page.route("**/api/info", lambda route: route.fulfill(
            json={**info, "modes": ["fill", "control", "edit"], "defaults": {**info["defaults"], "strength": 1.0}}))
        page.reload()
        page.wait_for_selector("body[data-ready]")
        assert [t.get_attribute("data-mode") for t in page.locator("#mode button:visible").all()] == [
            "edit", "fill", "control"]  # in the page's order, generate/img2img/inpaint hidden
        expect(page.locator("#mode-fill")).to_have_attribute("aria-selected", "true")  # the model's first
        expect(page.locator("#strength-value")).to_have_text("1.00")

        page.click("#mode-edit")
        expect(page.locator("#image-label")).to_have_text("Reference image")
        expect(page.locator("#strength")).to_be_hidden()
        page.set_input_files("#image-input", str(tmp_path / "reference.png"))
        expect(page.locator("#canvas-wrap")).to_be_visible()
        expect(page.locator("#mask-canvas")).to_be_hidden()  # Kontext takes no mask
        expect(page.locator("#size-preset")).to_have_value("source")
        page.fill("#prompt", "make it red")
        with page.expect_request(is_job_post) as sent:
            page.click("#generate")
        body = sent.value.post_data_json
        assert body["mode"] == "edit" and UPLOAD_ID.fullmatch(body["image"])
        assert "mask" not in body and "strength" not in body and "width" not in body  # the reference's size
        expect(page.locator("#error-text")).to_contain_text("400")  # the embedded model is no Kontext model

        page.click("#mode-control")
        expect(page.locator("#image-label")).to_have_text("Control image")
        with page.expect_request(is_job_post) as sent:
            page.click("#generate")
        body = sent.value.post_data_json
        assert body["mode"] == "control" and UPLOAD_ID.fullmatch(body["control_image"]) and "image" not in body

        page.click("#mode-fill")
        expect(page.locator("#mask-canvas")).to_be_visible()
        page.click("#generate")
        expect(page.locator("#error-text")).to_contain_text("paint the mask")  # Fill needs a mask
        assert not page.errors
    finally:
        page.context.close()


def test_phone_layout_is_one_column(browser, server):
    page = open_page(browser, server, viewport=PHONE)
    try:
        width = page.evaluate("document.scrollingElement.scrollWidth")
        assert width <= PHONE["width"], f"the page scrolls sideways: {width} px wide"
        expect(page.locator("#generate")).to_be_visible()
        button = page.locator("#generate").bounding_box()
        assert button["y"] + button["height"] <= PHONE["height"] and button["width"] > 200
        form, stage = page.locator("#form").bounding_box(), page.locator(".stage").bounding_box()
        assert form["y"] + form["height"] <= stage["y"]  # stacked, not side by side
        assert page.locator("#gallery .job").count() > 0  # the earlier tests' jobs
        page.click("#mode-inpaint")
        page.click("#negative-box summary")
        page.click("#advanced summary")
        width = page.evaluate("document.scrollingElement.scrollWidth")
        assert width <= PHONE["width"], f"with every section open the page scrolls sideways: {width} px wide"
        expect(page.locator("#generate")).to_be_in_viewport()
        assert not page.errors
    finally:
        page.context.close()


def test_token_is_asked_for_after_a_401_and_sent(browser, tmp_path):
    with live_server(tmp_path / "data", token="secret") as url:
        page = open_page(browser, url, ready=False)
        try:
            expect(page.locator("#token")).to_be_visible()
            expect(page.locator("#error-text")).to_contain_text("401")

            page.fill("#token", "wrong")
            page.click("#token-save")
            expect(page.locator("#token")).to_be_visible()  # refused again: asked again
            expect(page.locator("#error-text")).to_contain_text("401")

            page.fill("#token", "secret")
            page.click("#token-save")
            page.wait_for_selector("body[data-ready]")
            expect(page.locator("#auth")).to_be_hidden()
            expect(page.locator("#error")).to_be_hidden()
            assert page.evaluate("localStorage.getItem('rectiflux.token')") == "secret"

            page.fill("#prompt", PROMPT)
            page.fill("#seed", "3")
            page.fill("#steps", "40")
            page.evaluate(WATCH)
            job = submit(page)
            expect(page.locator("#status")).to_have_attribute("data-state", "done")
            assert any(0 < p < 1 for p in page.evaluate("window.__seen.progress"))  # the events came through
            final = wait_job(url, job["id"], token="secret")
            shown = page.locator("#results img").first
            expect(shown).to_have_attribute("src", re.compile(r"^blob:"))  # fetched with the header
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=shown.element_handle())
            status, data = http(url, final["images"][0]["url"], token="secret")
            assert status == 200 and np.array_equal(shown_pixels(shown), png_pixels(data))
            assert http(url, final["images"][0]["url"])[0] == 401

            page.reload()  # the token is remembered
            page.wait_for_selector("body[data-ready]")
            expect(page.locator("#auth")).to_be_hidden()
            expect(page.locator(f"#gallery .job[data-job='{job['id']}'] .thumb img")).to_have_attribute(
                "src", re.compile(r"^blob:"))
            assert not page.errors
        finally:
            page.context.close()
