"""One CPU thread for tiny calls, only when OpenMP threads sleep between parallel regions."""

import pytest
import torch

import rectiflux
from rectiflux.runtime.threads import SMALL_WORK, threads_for


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_tiny_calls_run_on_one_thread_only_when_openmp_threads_sleep(monkeypatch, two_threads):
    cpu = torch.device("cpu")
    seen = {}
    for policy in ("PASSIVE", "ACTIVE", None):
        if policy is None:
            monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        else:
            monkeypatch.setenv("OMP_WAIT_POLICY", policy)
        for work in (1000, SMALL_WORK):
            with threads_for(work, cpu):
                seen[policy, work] = torch.get_num_threads()
            assert torch.get_num_threads() == 2
    assert seen == {("PASSIVE", 1000): 1, ("PASSIVE", SMALL_WORK): 2, ("ACTIVE", 1000): 2, ("ACTIVE", SMALL_WORK): 2,
                    (None, 1000): 2, (None, SMALL_WORK): 2}
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    with pytest.raises(RuntimeError), threads_for(10, cpu):
        raise RuntimeError("a failing call")
    assert torch.get_num_threads() == 2  # restored
    with threads_for(10, torch.device("meta")):
        assert torch.get_num_threads() == 2  # other devices are not the CPU threads' business


def test_the_embedded_models_run_their_tiny_calls_on_one_thread(monkeypatch, two_threads):
    """Every model of the shapes pipeline (text encoders, transformer, VAE) runs on one thread under PASSIVE,
    and the image is the one two threads make (to float rounding)."""
    pipe = rectiflux.load()
    counts = []
    for module in (pipe.text_encoders.clip, pipe.text_encoders.t5, pipe.transformer.img_in, pipe.autoencoder.decoder):
        module.register_forward_pre_hook(lambda *_: counts.append(torch.get_num_threads()))
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    spinning = pipe("a red circle", seed=1, num_inference_steps=2, output_type="pt").images
    assert set(counts) == {2}
    counts.clear()
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    sleeping = pipe("a red circle", seed=1, num_inference_steps=2, output_type="pt").images
    assert set(counts) == {1} and len(counts) == 5 and torch.get_num_threads() == 2
    assert (spinning - sleeping).abs().max() < 1e-5


def test_overlapping_calls_from_threads_restore_the_count(monkeypatch, two_threads):
    """Two requests of a server overlap: whichever ends last restores the count, never leaving the process on one
    thread (toggling without a lock read 1 as the count to restore)."""
    import threading

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    cpu = torch.device("cpu")
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with threads_for(10, cpu):
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second() -> None:
        first_in.wait(10)
        with threads_for(10, cpu):
            second_in.set()
            first_out.wait(10)  # the first call ends while this one runs

    workers = [threading.Thread(target=first), threading.Thread(target=second)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(20)
    assert torch.get_num_threads() == 2
