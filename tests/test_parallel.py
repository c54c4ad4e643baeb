"""Ulysses sequence parallelism (rectiflux.parallel): the shard plan's pure functions, the two all-to-alls simulated
in one process, and one 2-process gloo launch (tests/parallel_worker.py) whose images must equal the
single-process ones: the embedded model, and tiny random models at token counts 2 does not divide
(text-to-image, true CFG with a batch, the step cache, img2img, inpainting, Kontext)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from tiny_models import make_tiny_flux_folder

from rectiflux.flux.layers import attention
from rectiflux.parallel import Plan, check_heads, exchanged_order, padded_length, sequence_parallel, shard_bounds
from rectiflux.parallel.sequence import (
    bytes_per_attention,
    heads_to_joint,
    joint_to_tokens,
    pad_rows,
    qkv_to_heads,
    shard_rows,
    tokens_from_heads,
    unshard_rows,
)

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("parallel_worker.py")
ATOL = 2e-4


def test_shard_bounds_for_uneven_counts():
    assert shard_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert shard_bounds(6, 2) == [(0, 3), (3, 6)]
    assert shard_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]  # fewer rows than ranks: empty shards
    assert shard_bounds(0, 2) == [(0, 0), (0, 0)]
    assert [padded_length(n, 2) for n in (0, 1, 6, 99)] == [0, 1, 3, 50]
    for n in range(12):
        for world in range(1, 5):
            sizes = [b - a for a, b in shard_bounds(n, world)]
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1 and max(sizes) == padded_length(n, world)
    with pytest.raises(ValueError):
        shard_bounds(3, 0)


@pytest.mark.parametrize("dim", [1, -2, -3])
def test_pad_and_unpad_round_trip(dim):
    x = torch.randn(2, 7, 5, 3)
    for world in (1, 2, 3, 4, 8):
        bounds = shard_bounds(x.shape[dim], world)
        shards = [shard_rows(x, bounds, r, dim) for r in range(world)]
        assert {s.shape[dim] for s in shards} == {padded_length(x.shape[dim], world)}
        torch.testing.assert_close(unshard_rows(torch.stack(shards), bounds, dim), x, rtol=0, atol=0)
    rotations = torch.polar(torch.ones(5, 1, 4), torch.randn(5, 1, 4))  # RoPE's rows are dim -3, padded with 1
    padded = pad_rows(rotations, 6, -3, 1)
    assert padded.shape == (6, 1, 4) and bool((padded[5] == 1).all()) and torch.equal(padded[:5], rotations)
    with pytest.raises(ValueError):
        pad_rows(x, 3, 1)


def test_heads_the_world_size_does_not_divide_are_refused():
    check_heads(24, 4)
    with pytest.raises(ValueError) as e:
        check_heads(24, 5)
    message = str(e.value)
    assert "\n" not in message and "24 attention heads" in message and "5 processes" in message


@pytest.mark.skipif(dist.is_available() and dist.is_initialized(), reason="a process group exists here")
def test_without_a_process_group_it_says_how_to_make_one():
    with pytest.raises(RuntimeError, match="torchrun"):
        sequence_parallel(torch.nn.Linear(1, 1))


def test_exchanged_order():
    # 3 text and 5 image tokens over 2 ranks: rank 0 holds txt 0-1 and img 0-2, rank 1 txt 2 (+1 pad) and
    # img 3-4 (+1 pad); after the exchange the rows are rank 0's 5 then rank 1's 5
    assert exchanged_order(3, 5, 2).tolist() == [0, 1, 5, 2, 3, 4, 7, 8]
    assert exchanged_order(4, 6, 2).tolist() == [0, 1, 5, 6, 2, 3, 4, 7, 8, 9]
    assert exchanged_order(3, 5, 1).tolist() == list(range(8))
    assert Plan(2, 1, 3, 5).padded and not Plan(2, 1, 4, 6).padded


@pytest.mark.parametrize("world, n_txt, n_img", [(3, 5, 7), (2, 4, 6), (4, 3, 2), (1, 3, 4)])
def test_the_two_all_to_alls_simulated_give_full_attention(world, n_txt, n_img):
    """Each rank's shard through both exchanges (done here by indexing lists) gives the attention of the whole
    sequence for its tokens; padding rows (zeros, as the sharded forward's) take no part and come back zero."""
    torch.manual_seed(0)
    b, h, d = 2, 12, 4
    q, k, v = (torch.randn(b, n_txt + n_img, h, d) for _ in range(3))
    want = attention(q, k, v)  # (B, L, H*D)
    plan = Plan(world, 0, n_txt, n_img)
    order = exchanged_order(n_txt, n_img, world)

    def local(x, r):
        return torch.cat([shard_rows(x[:, :n_txt], plan.txt_bounds, r, 1),
                          shard_rows(x[:, n_txt:], plan.img_bounds, r, 1)], dim=1)

    sent = [qkv_to_heads(local(q, r), local(k, r), local(v, r), world) for r in range(world)]
    assert sent[0].shape == (world, plan.local_len, 3, b, h // world, d)
    outs = []
    for r in range(world):
        qr, kr, vr = heads_to_joint(torch.stack([sent[i][r] for i in range(world)]), order)
        heads = slice(r * h // world, (r + 1) * h // world)
        for got, full in ((qr, q), (kr, k), (vr, v)):
            assert torch.equal(got, full[:, :, heads])  # the whole sequence in order, padding dropped
        outs.append(joint_to_tokens(attention(qr, kr, vr), order, world, plan.local_len))
    for r in range(world):
        got = tokens_from_heads(torch.stack([outs[i][r] for i in range(world)]))
        torch.testing.assert_close(got, local(want, r), rtol=1e-6, atol=1e-6)
    assert bytes_per_attention(plan, b, h, d, 4) == 4 * plan.local_len * b * h * d * 4 * (world - 1) // world


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    """One 2-process launch for every case: the worker writes the images and facts.json here."""
    root = tmp_path_factory.mktemp("parallel")
    tiny = make_tiny_flux_folder(root / "tiny")
    kontext = make_tiny_flux_folder(root / "kontext", variant="kontext")
    out = root / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), str(out), str(tiny), str(kontext)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, json.loads((out / "facts.json").read_text())


CASES = ["shapes", "t2i", "latents", "cfg-batch", "cache", "img2img", "inpaint", "kontext"]


@pytest.mark.parametrize("case", CASES)
def test_two_processes_make_the_single_process_image(launch, case):
    out, facts = launch
    single, parallel = np.load(out / f"{case}-single.npy"), np.load(out / f"{case}-parallel.npy")
    assert single.shape == parallel.shape and single.dtype == np.float32
    assert float(np.abs(parallel - single).max()) <= ATOL
    fact = facts["cases"][case]
    assert fact["ranks_max_abs"] == 0.0  # rank 1 made exactly rank 0's image
    assert len(set(fact["cached_steps"])) == 1  # the step cache skipped the same steps
    if case == "cache":
        assert fact["cached_steps"][0] > 0


def test_without_a_seed_every_rank_draws_the_first_ranks_noise(launch):
    out, facts = launch
    assert facts["cases"]["no-seed"]["ranks_max_abs"] == 0.0
    assert not (out / "no-seed-single.npy").exists() and (out / "no-seed-parallel.npy").exists()


def test_bytes_sent_and_the_refusal(launch):
    _, facts = launch
    assert facts["world"] == 2
    # the tiny model: 1 double and 2 single blocks, 2 heads of 8; 11 text and 99 image tokens; 3 steps
    per_call = bytes_per_attention(Plan(2, 0, 11, 99), 1, 2, 8, 4) * 3
    assert facts["cases"]["t2i"]["bytes_sent"] == 3 * per_call
    assert facts["cases"]["cfg-batch"]["bytes_sent"] == 3 * 2 * 2 * per_call  # a batch of 2, twice per step
    assert facts["refusal"] == ("sequence parallelism over 2 processes needs a head count divisible by 2, "
                                "but the model has 3 attention heads")


def test_the_command_line_under_torchrun_writes_the_single_process_image(tmp_path, monkeypatch):
    from PIL import Image

    from rectiflux import cli

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    prompt = "a large red circle on the left on a white background"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "rectiflux", "generate", prompt, "--seed", "3", "--sequence-parallel", "-o",
                           str(tmp_path / "split.png")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # the first process writes
    assert cli.main(["generate", prompt, "--seed", "3", "-o", str(tmp_path / "one.png")]) == 0
    split = np.asarray(Image.open(tmp_path / "split.png"), dtype=int)
    one = np.asarray(Image.open(tmp_path / "one.png"), dtype=int)
    assert np.abs(split - one).max() <= 1  # 8-bit rounding of images equal to ~1e-6
    assert cli.main(["generate", prompt, "--sequence-parallel", "-o", str(tmp_path / "alone.png")]) == 2
