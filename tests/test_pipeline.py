"""FluxPipeline (text-to-image, img2img, inpainting) against diffusers' three FLUX pipelines.

Every parity test runs our pipeline and the diffusers one on the same tiny random folder, with the same arguments and
identically seeded generators, and compares the outputs. A tiny VAE downsamples by 2, so the pipeline's size multiple
is 4 (FLUX.1's is 16). guidance_scale, strength and num_inference_steps are always passed: the defaults differ
between the diffusers pipelines (3.5 / 7.0) and ours (read from the model).
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline
from diffusers import FluxPipeline as DiffusersFluxPipeline
from PIL import Image
from tiny_models import make_tiny_flux_folder

from rectiflux.pipelines.load import load

ATOL = 2e-4
H, W = 32, 48  # non-square, a multiple of 4
STEPS = 3
SEQ = 32  # max_sequence_length, short to keep the runs fast
COMMON = {"height": H, "width": W, "num_inference_steps": STEPS, "guidance_scale": 3.5, "max_sequence_length": SEQ,
          "output_type": "np"}
PROMPT = "a large red circle on the left on a white background"
PROMPTS = ["a small blue square at the top", "a green triangle in the center"]
NEGATIVE = "a black cross"
LONG = " ".join(["a large red circle on the left on a white background"] * 4)  # 45 T5 tokens


class Models:
    """Both tiny folders (with and without a guidance embedder), our pipelines and the diffusers ones, built once."""

    def __init__(self, root):
        self.root, self._ours, self._ref = root, {}, {}

    def ours(self, kind: str):
        if kind not in self._ours:
            self._ours[kind] = load(self._folder(kind), dtype=torch.float32)
        return self._ours[kind]

    def ref(self, kind: str, mode: str):
        if (kind, "t2i") not in self._ref:
            base = DiffusersFluxPipeline.from_pretrained(self._folder(kind), local_files_only=True)
            self._ref[kind, "t2i"] = base
            self._ref[kind, "i2i"] = FluxImg2ImgPipeline.from_pipe(base)
            self._ref[kind, "inpaint"] = FluxInpaintPipeline.from_pipe(base)
            for pipe in (self._ref[kind, m] for m in ("t2i", "i2i", "inpaint")):
                pipe.set_progress_bar_config(disable=True)
        return self._ref[kind, mode]

    def _folder(self, kind: str):
        return make_tiny_flux_folder(self.root / kind, guidance_embeds=kind == "dev")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return Models(tmp_path_factory.mktemp("pipeline"))


def generators(seeds):
    if isinstance(seeds, int):
        return torch.Generator().manual_seed(seeds)
    return [torch.Generator().manual_seed(s) for s in seeds]


def mode_of(kwargs) -> str:
    return "inpaint" if kwargs.get("mask_image") is not None else "i2i" if kwargs.get("image") is not None else "t2i"


def both(models, kind, seeds=0, **kwargs):
    """(ours, diffusers') .images for the same call; kwargs override COMMON."""
    kwargs = {**COMMON, **kwargs}
    ours = models.ours(kind)(generator=generators(seeds), **kwargs).images
    ref = models.ref(kind, mode_of(kwargs))(generator=generators(seeds), **kwargs).images
    return ours, ref


def assert_close(got, want, atol=ATOL):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == want.dtype == np.float32
    diff = np.abs(got - want).max()
    assert diff <= atol, f"max abs diff {diff} > {atol}"


def assert_same_pil(got, want, tol=1):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert isinstance(g, Image.Image) and g.size == w.size and g.mode == w.mode == "RGB"
        diff = np.abs(np.asarray(g, dtype=np.int16) - np.asarray(w, dtype=np.int16)).max()
        assert diff <= tol, f"max pixel diff {diff} > {tol}"


def assert_differ(a, b):
    """The feature under test has an effect well above the parity tolerance, so a parity test about it can fail."""
    diff = np.abs(np.asarray(a) - np.asarray(b)).max()
    assert diff > 10 * ATOL, f"max abs diff {diff}: the feature changed nothing"


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colourful RGB image with a little noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rgb = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 5 + y / 7)], axis=-1)
    rgb += np.random.default_rng(seed).uniform(-0.1, 0.1, rgb.shape)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))


def grey_mask(width: int, height: int) -> Image.Image:
    """Black outside a box; inside it a grey ramp from 40 to 250, so only its right part survives binarising."""
    m = np.zeros((height, width), dtype=np.uint8)
    y1, y2, x1, x2 = height // 4, height * 5 // 8, width // 3, width * 3 // 4
    m[y1:y2, x1:x2] = np.linspace(40, 250, x2 - x1).round().astype(np.uint8)[None]
    return Image.fromarray(m, mode="L")


# ---------------------------------------------------------------------------------------------------------------------
# text-to-image


@pytest.mark.parametrize("kind", ["dev", "schnell"])
@pytest.mark.parametrize("size", [(H, W), (W, H)], ids=["wide", "tall"])
def test_text_to_image(models, kind, size):
    ours, ref = both(models, kind, prompt=PROMPT, height=size[0], width=size[1])
    assert ours.shape == (1, *size, 3)
    assert_close(ours, ref)
    assert 0.05 < ours.std() and 0.01 < ours.mean() < 0.99  # not a blank or clipped image


@pytest.mark.parametrize("kind", ["dev", "schnell"])
def test_prompt_batch_images_per_prompt_generator_list_and_prompt_2(models, kind):
    kwargs = {"prompt": PROMPTS, "prompt_2": ["a tiny cat", "a yellow sun in the sky"], "num_images_per_prompt": 2}
    ours, ref = both(models, kind, seeds=[3, 4, 5, 6], **kwargs)
    assert ours.shape == (4, H, W, 3)
    assert_close(ours, ref)
    without_prompt_2 = models.ours(kind)(prompt=PROMPTS, num_images_per_prompt=2, generator=generators([3, 4, 5, 6]),
                                         **COMMON).images
    assert_differ(ours, without_prompt_2)
    # one generator per image: image 2 (prompt 1's first) matches a single run with that image's seed
    single = models.ours(kind)(prompt=PROMPTS[1], prompt_2=kwargs["prompt_2"][1], generator=generators(5),
                               **COMMON).images
    assert_close(ours[2:3], single, atol=1e-5)


def test_custom_sigmas(models):
    sigmas = [1.0, 0.75, 0.45, 0.2]
    ours, ref = both(models, "dev", prompt=PROMPT, sigmas=sigmas, num_inference_steps=len(sigmas))
    assert_close(ours, ref)
    default = models.ours("dev")(prompt=PROMPT, generator=generators(0), **{**COMMON, "num_inference_steps": 4}).images
    assert_differ(ours, default)


def test_sigmas_alone_set_the_step_count(models):
    """diffusers takes the number of steps from `sigmas` when num_inference_steps is not given."""
    kwargs = {k: v for k, v in COMMON.items() if k != "num_inference_steps"}
    sigmas = [1.0, 0.6, 0.3]
    ours = models.ours("dev")(prompt=PROMPT, sigmas=sigmas, generator=generators(0), **kwargs).images
    ref = models.ref("dev", "t2i")(prompt=PROMPT, sigmas=sigmas, generator=generators(0), **kwargs).images
    assert_close(ours, ref)


@pytest.mark.parametrize("kind", ["dev", "schnell"])
def test_true_cfg(models, kind):
    on, ref_on = both(models, kind, prompt=PROMPTS, negative_prompt=[NEGATIVE, "a white circle"],
                      true_cfg_scale=2.0)
    assert_close(on, ref_on)
    # a negative prompt with true_cfg_scale 1 is ignored by both
    off, ref_off = both(models, kind, prompt=PROMPTS, negative_prompt=[NEGATIVE, "a white circle"],
                        true_cfg_scale=1.0)
    assert_close(off, ref_off)
    assert_differ(on, off)


def test_prompt_embeds_passed_directly(models):
    rng = torch.Generator().manual_seed(11)
    embeds, pooled = torch.randn(2, SEQ, 32, generator=rng), torch.randn(2, 32, generator=rng)
    neg, neg_pooled = torch.randn(2, SEQ, 32, generator=rng), torch.randn(2, 32, generator=rng)
    ours, ref = both(models, "dev", seeds=[1, 2], prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    assert_close(ours, ref)
    # num_images_per_prompt repeats given embeddings too (diffusers does not, so it gets them repeated)
    ours = models.ours("dev")(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=neg,
                              negative_pooled_prompt_embeds=neg_pooled, true_cfg_scale=2.0, num_images_per_prompt=2,
                              generator=generators([1, 2, 3, 4]), **COMMON).images
    rep = lambda t: t.repeat_interleave(2, dim=0)  # noqa: E731
    ref = models.ref("dev", "t2i")(prompt_embeds=rep(embeds), pooled_prompt_embeds=rep(pooled),
                                   negative_prompt_embeds=rep(neg), negative_pooled_prompt_embeds=rep(neg_pooled),
                                   true_cfg_scale=2.0, generator=generators([1, 2, 3, 4]), **COMMON).images
    assert_close(ours, ref)


@pytest.mark.parametrize("kind", ["dev", "schnell"])
def test_latent_output(models, kind):
    ours, ref = both(models, kind, prompt=PROMPT, output_type="latent")
    assert isinstance(ours, torch.Tensor) and ours.shape == (1, (H // 4) * (W // 4), 64)
    assert_close(ours.numpy(), ref.numpy())


@pytest.mark.parametrize("mode", ["t2i", "i2i"])
def test_seed_is_a_cpu_generator(models, mode):
    extra = {"image": picture(W, H), "strength": 0.7} if mode == "i2i" else {}
    ours = models.ours("dev")(prompt=PROMPT, seed=1234, **extra, **COMMON).images
    ref = models.ref("dev", mode)(prompt=PROMPT, generator=torch.Generator().manual_seed(1234), **extra,
                                  **COMMON).images
    assert_close(ours, ref)
    other = models.ours("dev")(prompt=PROMPT, seed=1235, **extra, **COMMON).images
    assert_differ(ours, other)


# ---------------------------------------------------------------------------------------------------------------------
# img2img


@pytest.mark.parametrize("strength", [0.3, 0.6, 0.85, 1.0])
def test_img2img_strengths(models, strength):
    source = picture(72, 48)  # resized to 48x32
    ours, ref = both(models, "dev", prompt=PROMPT, image=source, strength=strength, num_inference_steps=5)
    assert ours.shape == (1, H, W, 3)
    assert_close(ours, ref)


@pytest.mark.parametrize("kind", ["dev", "schnell"])
def test_img2img_prompt_batch_with_one_image_and_generator_list(models, kind):
    ours, ref = both(models, kind, seeds=[8, 9], prompt=PROMPTS, image=picture(W, H, seed=1), strength=0.8,
                     num_inference_steps=4)
    assert ours.shape == (2, H, W, 3)
    assert_close(ours, ref)


def test_img2img_true_cfg(models):
    ours, ref = both(models, "dev", prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=2.0,
                     image=picture(W, H), strength=0.9)
    assert_close(ours, ref)


@pytest.mark.filterwarnings("ignore:Passing `image` as torch tensor with value range in \\[-1,1\\]:FutureWarning")
@pytest.mark.parametrize("low", [0.0, -1.0], ids=["0..1", "-1..1"])
def test_img2img_tensor_image(models, low):
    """diffusers reads a tensor image as [0, 1], or as [-1, 1] when it has negative values."""
    image = low + (1 - low) * torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(3))
    ours, ref = both(models, "dev", prompt=PROMPT, image=image, strength=0.6)
    assert_close(ours, ref)


# ---------------------------------------------------------------------------------------------------------------------
# inpainting

INPAINT_CASES = [
    # kind, (height, width), padding_mask_crop, true CFG, prompts
    ("dev", (H, W), None, False, PROMPT),
    ("dev", (W, H), None, True, PROMPTS),
    ("schnell", (W, H), None, False, PROMPT),
    ("schnell", (H, W), None, True, PROMPTS),
    ("dev", (H, W), 4, False, PROMPT),
    ("dev", (W, H), 2, True, PROMPTS),
    ("schnell", (H, W), 3, False, PROMPTS),
]


@pytest.mark.parametrize(("kind", "size", "crop", "cfg", "prompt"), INPAINT_CASES,
                         ids=[f"{k}-{s[0]}x{s[1]}-crop{c}-cfg{int(g)}-batch{1 + isinstance(p, list)}"
                              for k, s, c, g, p in INPAINT_CASES])
def test_inpainting(models, kind, size, crop, cfg, prompt):
    height, width = size
    source, mask = picture(width * 5 // 4, height * 5 // 4, seed=2), grey_mask(width * 5 // 4, height * 5 // 4)
    batch = len(prompt) if isinstance(prompt, list) else 1
    kwargs = {"prompt": prompt, "image": source, "mask_image": mask, "strength": 0.8, "num_inference_steps": 4,
              "height": height, "width": width, "padding_mask_crop": crop}
    if cfg:
        kwargs.update(negative_prompt=[NEGATIVE] * batch, true_cfg_scale=2.0)
    if crop is not None:  # diffusers pastes the crop back only for PIL output, and refuses other types
        kwargs["output_type"] = "pil"
    ours, ref = both(models, kind, seeds=list(range(batch)), **kwargs)
    if crop is None:
        assert ours.shape == (batch, height, width, 3)
        assert_close(ours, ref)
    else:
        assert all(o.size == source.size for o in ours)
        assert_same_pil(ours, ref)
        # outside the mask's box the original shows through untouched
        o, s = np.asarray(ours[0]), np.asarray(source)
        assert (o[:, :2] == s[:, :2]).all() and (o[-2:] == s[-2:]).all()


def test_inpainting_latents_and_mask_semantics(models):
    """Latent output matches; two prompts give latents equal exactly where the binarised mask keeps the source."""
    kwargs = {**COMMON, "output_type": "latent", "image": picture(W, H, seed=2), "mask_image": grey_mask(W, H),
              "strength": 0.8, "num_inference_steps": 4}
    ours = models.ours("dev")(prompt=PROMPT, generator=generators(0), **kwargs).images
    ref_pipe = models.ref("dev", "inpaint")
    ref = ref_pipe(prompt=PROMPT, generator=generators(0), **kwargs).images
    assert_close(ours.numpy(), ref.numpy())
    other = models.ours("dev")(prompt=NEGATIVE, generator=generators(0), **kwargs).images
    # the expected latent mask, from diffusers' own mask processing
    mask = ref_pipe.mask_processor.preprocess(kwargs["mask_image"], height=H, width=W)
    assert 0 < mask.mean() < (np.asarray(kwargs["mask_image"]) > 0).mean()  # grey below 0.5 was dropped
    mask = torch.nn.functional.interpolate(mask, size=(H // 2, W // 2)).repeat(1, 16, 1, 1)
    mask = ref_pipe._pack_latents(mask, 1, 16, H // 2, W // 2)
    same = (ours - other).abs() < 1e-6
    assert torch.equal(same, mask == 0)


# ---------------------------------------------------------------------------------------------------------------------
# step callback


def test_callback_on_step_end(models):
    def recorder(log):
        def callback(pipe, i, t, tensors):
            log.append((i, float(t), sorted(tensors), tensors["latents"].clone()))
            return {"latents": tensors["latents"] * 0.5} if i == 1 else {}
        return callback

    ours_log, ref_log = [], []
    ours = models.ours("dev")(prompt=PROMPT, generator=generators(0), callback_on_step_end=recorder(ours_log),
                              **COMMON).images
    ref = models.ref("dev", "t2i")(prompt=PROMPT, generator=generators(0), callback_on_step_end=recorder(ref_log),
                                   **COMMON).images
    assert [entry[0] for entry in ours_log] == list(range(STEPS))
    assert all(entry[2] == ["latents"] for entry in ours_log)
    for (_, t, _, latents), (_, ref_t, _, ref_latents) in zip(ours_log, ref_log, strict=True):
        assert abs(t - ref_t) < 1e-3
        assert_close(latents.numpy(), ref_latents.numpy())
    assert_close(ours, ref)
    plain = models.ours("dev")(prompt=PROMPT, generator=generators(0), **COMMON).images
    assert_differ(ours, plain)


# ---------------------------------------------------------------------------------------------------------------------
# sizes


@pytest.mark.parametrize(("height", "width"), [(30, 46), (29, 45)])
def test_size_not_a_multiple_is_kept(models, height, width):
    """Generated at the next multiple (32x48), then centre-cropped to exactly the size asked for."""
    ours = models.ours("dev")(prompt=PROMPT, generator=generators(0), **{**COMMON, "height": height, "width": width})
    ref = models.ref("dev", "t2i")(prompt=PROMPT, generator=generators(0), **COMMON).images
    top, left = (H - height) // 2, (W - width) // 2
    assert ours.images.shape == (1, height, width, 3)
    assert_close(ours.images, ref[:, top:top + height, left:left + width])
    pil = models.ours("dev")(prompt=PROMPT, generator=generators(0),
                             **{**COMMON, "height": height, "width": width, "output_type": "pil"}).images
    assert pil[0].size == (width, height)


def test_img2img_keeps_the_source_size(models):
    source = picture(46, 30)
    kwargs = {k: v for k, v in COMMON.items() if k not in ("height", "width")}
    ours = models.ours("dev")(prompt=PROMPT, image=source, strength=0.7, generator=generators(0), **kwargs).images
    ref = models.ref("dev", "i2i")(prompt=PROMPT, image=source, strength=0.7, generator=generators(0),
                                   **COMMON).images
    assert ours.shape == (1, 30, 46, 3)
    assert_close(ours, ref[:, 1:31, 1:47])


# ---------------------------------------------------------------------------------------------------------------------
# bad inputs: a one-line ValueError before any model runs


@contextlib.contextmanager
def watch_models(pipe):
    """Record every forward call of the text encoders, the transformer and the autoencoder."""
    calls = []
    modules = {"transformer": pipe.transformer, "vae encoder": pipe.autoencoder.encoder,
               "vae decoder": pipe.autoencoder.decoder, "clip": pipe.text_encoders.clip, "t5": pipe.text_encoders.t5}
    handles = [m.register_forward_pre_hook(lambda *_, name=name: calls.append(name)) for name, m in modules.items()]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def test_watch_models_sees_a_normal_run(models):
    with watch_models(models.ours("dev")) as calls:
        models.ours("dev")(prompt=PROMPT, image=picture(W, H), strength=1.0, generator=generators(0), **COMMON)
    assert set(calls) == {"transformer", "vae encoder", "vae decoder", "clip", "t5"}


IMAGE, MASK = picture(W, H), grey_mask(W, H)
BAD_INPUTS = [
    pytest.param({"image": IMAGE, "strength": 0.0}, "strength", id="strength-0"),
    pytest.param({"image": IMAGE, "strength": 1.5}, "strength", id="strength-1.5"),
    pytest.param({"num_inference_steps": 0}, "num_inference_steps", id="steps-0"),
    pytest.param({"max_sequence_length": 0}, "max_sequence_length", id="max-sequence-length-0"),
    pytest.param({"width": 8}, "width", id="width-8"),
    pytest.param({"width": 100_000}, "width", id="width-100000"),
    pytest.param({"image": IMAGE, "mask_image": grey_mask(W, H + 4), "strength": 0.6}, "mask", id="mask-size"),
    pytest.param({"mask_image": MASK}, "image", id="mask-without-image"),
    pytest.param({"output_type": "jpeg"}, "output_type", id="output-type"),
    pytest.param({"generator": generators([0, 1, 2])}, "generator", id="generator-list-t2i"),
    pytest.param({"image": IMAGE, "strength": 0.6, "generator": generators([0, 1, 2])}, "generator",
                 id="generator-list-img2img"),
    pytest.param({"prompt": LONG, "max_sequence_length": 16}, "max_sequence_length", id="long-prompt"),
    pytest.param({"prompt_2": LONG, "max_sequence_length": 16}, "max_sequence_length", id="long-prompt-2"),
    pytest.param({"negative_prompt": LONG, "true_cfg_scale": 2.0, "max_sequence_length": 16}, "max_sequence_length",
                 id="long-negative-prompt"),
]


@pytest.mark.parametrize(("bad", "word"), BAD_INPUTS)
def test_bad_input_is_a_one_line_value_error_before_any_model_runs(models, bad, word):
    pipe = models.ours("dev")
    kwargs = {**COMMON, "prompt": PROMPT, "generator": generators(0), **bad}
    with watch_models(pipe) as calls, pytest.raises(ValueError) as excinfo:
        pipe(**kwargs)
    message = str(excinfo.value)
    assert word in message and "\n" not in message, message
    assert calls == [], f"{calls} ran before the error"
