"""dtype="auto": the candidates timed once per process and width, the faster chosen only by a margin, each model
loaded in its choice, recorded and replayed."""

import numpy as np
import pytest
import torch
from tiny_models import make_tiny_flux_folder

import rectiflux.runtime.kernels as kernels
from rectiflux.images import psnr
from rectiflux.pipelines.load import load

CALL = {"prompt": "a red circle", "height": 32, "width": 32, "num_inference_steps": 2, "guidance_scale": 3.5,
        "max_sequence_length": 16, "seed": 0, "output_type": "np"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_flux_folder(tmp_path_factory.mktemp("tiny") / "flux")


@pytest.fixture
def timings(monkeypatch):
    """Fake kernel times (seconds by dtype), counting the measurements."""
    calls, conv_calls = [], []
    times = {"linear": {torch.float32: 1.0, torch.bfloat16: 0.5}, "conv": {torch.float32: 1.0, torch.bfloat16: 1.1}}
    monkeypatch.setattr(kernels, "_chosen", {})
    monkeypatch.setattr(kernels, "_linear_time",
                        lambda dtype, width, give_up=None: calls.append(width) or times["linear"][dtype])
    monkeypatch.setattr(kernels, "_conv_time",
                        lambda dtype, give_up=None: conv_calls.append(dtype) or times["conv"][dtype])
    return times, calls, conv_calls


def test_the_faster_dtype_is_chosen_per_model_and_measured_once(timings):
    times, calls, conv_calls = timings
    assert kernels.fastest_dtypes("cpu", 3072) == {"transformer": torch.bfloat16, "vae": torch.float32,
                                                   "text_encoders": torch.bfloat16}
    assert kernels.fastest_dtypes("cpu", 3072)["transformer"] == torch.bfloat16
    assert calls == [3072, 3072]  # float32 and bfloat16, once
    times["conv"][torch.bfloat16] = 0.5
    assert kernels.fastest_dtypes("cpu", 4096)["vae"] == torch.bfloat16
    times["conv"][torch.bfloat16] = 1.1
    calls.clear()
    times["linear"][torch.bfloat16] = 0.9  # faster, but not by MARGIN: not worth its rounding
    assert kernels.fastest_dtypes("cpu", 1536)["transformer"] == torch.float32
    times["linear"][torch.bfloat16] = 6.0  # an AVX2-only CPU: bfloat16 6x slower
    times["conv"][torch.bfloat16] = 0.1  # not believed: where the linear loses, the convolution is not timed
    conv_calls.clear()
    assert kernels.fastest_dtypes("cpu", 2048) == dict.fromkeys(kernels.COMPONENTS, torch.float32)
    assert conv_calls == []
    calls.clear()
    times["linear"][torch.bfloat16] = 0.1
    assert kernels.fastest_dtypes("cpu", 128) == dict.fromkeys(kernels.COMPONENTS, torch.float32)  # a tiny model
    assert calls == []


def test_a_candidate_far_slower_than_the_bound_stops_being_timed(monkeypatch):
    calls = []
    clock = iter(range(100))
    monkeypatch.setattr(kernels.time, "perf_counter", lambda: 10.0 * next(clock))  # every timed call takes 10 s
    assert kernels.best_seconds(lambda: calls.append(1), give_up=5.0) == 10.0
    assert len(calls) == 2  # the set-up call may take twice the bound; the next one gave up
    calls.clear()
    assert kernels.best_seconds(lambda: calls.append(1), give_up=4.9) == 10.0
    assert len(calls) == 1  # a set-up call over twice the bound gives up at once
    calls.clear()
    assert kernels.best_seconds(lambda: calls.append(1), repeats=4) == 10.0
    assert len(calls) == 6  # two warm-up calls and four timed ones


def test_the_set_up_call_runs_first_and_is_not_timed(monkeypatch):
    calls = []
    clock = iter(range(100))
    monkeypatch.setattr(kernels.time, "perf_counter", lambda: next(clock))  # every timed call takes 1 s
    # a set-up call that took 50 s would have given up on a kernel whose calls take 1 s against a 2 s bound
    assert kernels.best_seconds(lambda: calls.append("call"), give_up=2.0, setup=lambda: calls.append("setup")) == 1.0
    assert calls == ["setup"] + ["call"] * 5


def test_the_best_timed_call_is_returned_and_warm_up_calls_are_not_counted(monkeypatch):
    durations = iter([9.0, 8.0, 3.0, 2.0, 4.0])
    now = [0.0]

    def clock():
        now[0] += next(durations) if clock.running else 0.0
        clock.running = not clock.running
        return now[0]

    clock.running = False
    monkeypatch.setattr(kernels.time, "perf_counter", clock)
    assert kernels.best_seconds(lambda: None, repeats=3, give_up=10.0) == 2.0


def test_the_real_probe_answers_with_float_dtypes():
    chosen = kernels.fastest_dtypes("cpu", 1024)
    assert set(chosen) == set(kernels.COMPONENTS)
    assert set(chosen.values()) <= {torch.float32, torch.bfloat16}


def test_auto_loads_each_model_in_its_choice_and_stays_close_to_float32(folder, timings, monkeypatch):
    monkeypatch.setattr(kernels, "SMALL_WIDTH", 1)  # measure (fake timings) even for the tiny test model
    pipe = load(folder, dtype="auto")
    assert pipe.dtypes == {"transformer": torch.bfloat16, "vae": torch.float32, "text_encoders": torch.bfloat16}
    image = pipe(**CALL).images
    reference = load(folder)(**CALL).images
    assert psnr(image, reference) >= 35
    # a mapping (what a recipe records) gives exactly that, with no measurement
    times, calls, _ = timings
    calls.clear()
    again = load(folder, dtype={k: str(v).removeprefix("torch.") for k, v in pipe.dtypes.items()})
    assert again.dtypes == pipe.dtypes and calls == []
    assert np.array_equal(again(**CALL).images, image)
    with pytest.raises(ValueError, match="names each of transformer, vae, text_encoders"):
        load(folder, dtype={"transformer": "bfloat16"})
    with pytest.raises(ValueError, match="unknown dtype"):
        load(folder, dtype="fastest")


def test_the_attention_probe_times_once_and_only_cpus_with_bfloat16(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "_by_head", None)
    monkeypatch.setattr(kernels, "best_seconds", lambda fn, **kw: calls.append(kw.get("give_up")) or len(calls))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert kernels.attention_by_head_is_faster("cpu") is False  # SDPA 1 s, by head 2 s
    assert kernels.attention_by_head_is_faster("cpu") is False and len(calls) == 2
    assert calls[1] == 2  # by head is given up once a call takes twice SDPA's
    assert kernels.attention_by_head_is_faster("meta") is False and len(calls) == 2  # no CPU: not timed
    monkeypatch.setattr(kernels, "_by_head", None)
    monkeypatch.setattr(kernels, "best_seconds", lambda fn, **kw: 1.0 if "give_up" not in kw else 0.5)
    assert kernels.attention_by_head_is_faster("cpu") is True  # 2x faster: more than MARGIN
    monkeypatch.setattr(kernels, "_by_head", None)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert kernels.attention_by_head_is_faster("cpu") is False  # no bfloat16 kernels (AVX2): not timed
