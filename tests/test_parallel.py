"""Sequence parallelism (rectiflux.parallel): the shard plan's pure functions, the two all-to-alls simulated in one
process, ring attention's key masks and online-softmax merge, and one 2-process gloo launch
(tests/parallel_worker.py) whose images must equal the single-process ones with both backends, Ulysses and ring:
the embedded model, and tiny random models at token counts 2 does not divide (text-to-image, true CFG with a batch,
the step cache, img2img, inpainting, Kontext), and for ring a 3-head model Ulysses refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from tiny_models import make_tiny_flux_folder

from rectiflux.flux.layers import attention
from rectiflux.parallel import Plan, check_heads, exchanged_order, padded_length, sequence_parallel, shard_bounds
from rectiflux.parallel.ring import block_attention, bytes_per_ring_attention, key_mask, merge_partials
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


def test_an_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="ulysses, ring"):
        sequence_parallel(torch.nn.Linear(1, 1), backend="flash")


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


def test_key_mask_marks_each_shards_real_rows():
    # 3 text and 5 image tokens over 2 ranks: local [txt 2; img 3] rows; rank 1 holds 1 text and 2 image tokens
    plan = Plan(2, 0, 3, 5)
    assert key_mask(plan, 0).tolist() == [True] * 5
    assert key_mask(plan, 1).tolist() == [True, False, True, True, False]
    plan = Plan(4, 0, 2, 1)  # fewer tokens than ranks: rank 3 has no real row
    assert [key_mask(plan, r).tolist() for r in range(4)] == [[True, True], [True, False], [False, False],
                                                               [False, False]]
    for world, n_txt, n_img in ((3, 5, 7), (2, 11, 99), (4, 3, 2)):
        plan = Plan(world, 0, n_txt, n_img)
        masks = torch.stack([key_mask(plan, r) for r in range(world)])
        assert masks.shape == (world, plan.local_len) and int(masks.sum()) == n_txt + n_img
        real = masks.flatten().nonzero().flatten()  # the rows the Ulysses exchange keeps, in another order
        assert torch.equal(real, exchanged_order(n_txt, n_img, world).sort().values)


def test_merging_partial_results_over_key_blocks_gives_softmax_attention():
    torch.manual_seed(0)
    b, h, n, d = 2, 3, 10, 8
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    want = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).unflatten(-1, (h, d)).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / d ** 0.5
    whole, lse = block_attention(q, k, v)
    torch.testing.assert_close(whole, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=1e-6, atol=1e-6)
    for cuts in ((0, 4, 10), (0, 1, 2, 7, 10), (0, 10, 10), (0, 3, 3, 10)):  # empty blocks included
        out = lse = None
        for start, end in pairwise(cuts):
            part = block_attention(q, k[:, :, start:end], v[:, :, start:end])
            out, lse = part if out is None else merge_partials(out, lse, *part)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=1e-5, atol=1e-5)
    # merging is symmetric, and masked keys (padding filled with large values) take no part
    a, c = block_attention(q, k[:, :, :4], v[:, :, :4]), block_attention(q, k[:, :, 4:], v[:, :, 4:])
    for x, y in zip(merge_partials(*a, *c), merge_partials(*c, *a), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)
    mask = torch.tensor([True] * 7 + [False] * 3)
    padded_k, padded_v = k.clone(), v.clone()
    padded_k[:, :, 7:], padded_v[:, :, 7:] = 50.0, 1e4
    got, _ = block_attention(q, padded_k, padded_v, mask)
    torch.testing.assert_close(got, block_attention(q, k[:, :, :7], v[:, :, :7])[0], rtol=1e-6, atol=1e-6)
    # a block with no real key: output 0, log-sum-exp -inf, and it changes nothing when merged
    empty = block_attention(q, padded_k, padded_v, torch.zeros(n, dtype=torch.bool))
    assert bool((empty[0] == 0).all()) and bool(torch.isneginf(empty[1]).all())
    for x, y in zip(merge_partials(*a, *empty), a, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    both = merge_partials(*empty, *empty)
    assert bool((both[0] == 0).all()) and bool(torch.isneginf(both[1]).all())


@pytest.mark.parametrize("world, n_txt, n_img", [(3, 5, 7), (2, 11, 99), (4, 3, 2)])
def test_the_ring_simulated_gives_full_attention(world, n_txt, n_img):
    """Each rank's queries against every rank's padded k/v shard, masked and merged in ring order (done here by
    indexing lists), give the whole sequence's attention for its real tokens, with 3 heads."""
    torch.manual_seed(0)
    b, h, d = 2, 3, 4
    q, k, v = (torch.randn(b, h, n_txt + n_img, d) for _ in range(3))
    want = block_attention(q, k, v)[0]
    plan = Plan(world, 0, n_txt, n_img)

    def local(x, r):  # padding rows filled with values that would show
        return torch.cat([shard_rows(x[:, :, :n_txt], plan.txt_bounds, r, 2, 7.0),
                          shard_rows(x[:, :, n_txt:], plan.img_bounds, r, 2, 7.0)], dim=2)

    for r in range(world):
        out = lse = None
        for step in range(world):
            source = (r - step) % world
            part = block_attention(local(q, r), local(k, source), local(v, source), key_mask(plan, source))
            out, lse = part if out is None else merge_partials(out, lse, *part)
        real = key_mask(plan, r)
        torch.testing.assert_close(out[:, :, real], local(want, r)[:, :, real], rtol=1e-5, atol=1e-5)
    assert bytes_per_ring_attention(plan, b, h, d, 4) == 2 * plan.local_len * b * h * d * 4 * (world - 1)


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


RING_DIFFS: dict[str, float] = {}


@pytest.mark.parametrize("case", CASES)
def test_two_processes_with_ring_attention_make_the_single_process_image(launch, case):
    out, facts = launch
    single, ring = np.load(out / f"{case}-single.npy"), np.load(out / f"{case}-ring.npy")
    assert single.shape == ring.shape and single.dtype == np.float32
    RING_DIFFS[case] = float(np.abs(ring - single).max())
    assert RING_DIFFS[case] <= ATOL
    fact = facts["ring"][case]
    assert fact["ranks_max_abs"] == 0.0
    assert len(set(fact["cached_steps"])) == 1
    if case == "cache":
        assert fact["cached_steps"][0] > 0


@pytest.mark.parametrize("tokens", ["1-13", "1-1"])
def test_ring_attention_takes_a_head_count_ulysses_refuses(launch, tokens):
    out, facts = launch
    single, ring = np.load(out / f"heads3-{tokens}-single.npy"), np.load(out / f"heads3-{tokens}-ring.npy")
    assert single.shape == ring.shape and float(np.abs(ring - single).max()) <= ATOL
    fact = facts["heads3"][tokens]
    assert fact["ranks_max_abs"] == 0.0
    assert fact["refusal"] == ("sequence parallelism over 2 processes needs a head count divisible by 2, "
                               "but the model has 3 attention heads")


def test_without_a_seed_every_rank_draws_the_first_ranks_noise(launch):
    out, facts = launch
    assert facts["cases"]["no-seed"]["ranks_max_abs"] == 0.0
    assert facts["ring"]["no-seed"]["ranks_max_abs"] == 0.0
    assert not (out / "no-seed-single.npy").exists() and (out / "no-seed-parallel.npy").exists()


def test_bytes_sent_and_the_refusal(launch):
    _, facts = launch
    assert facts["world"] == 2
    # the tiny model: 1 double and 2 single blocks, 2 heads of 8; 11 text and 99 image tokens; 3 steps
    per_call = bytes_per_attention(Plan(2, 0, 11, 99), 1, 2, 8, 4) * 3
    assert facts["cases"]["t2i"]["bytes_sent"] == 3 * per_call
    assert facts["cases"]["cfg-batch"]["bytes_sent"] == 3 * 2 * 2 * per_call  # a batch of 2, twice per step
    ring = bytes_per_ring_attention(Plan(2, 0, 11, 99), 1, 2, 8, 4) * 3
    assert facts["ring"]["t2i"]["bytes_sent"] == 3 * ring and facts["ring"]["cfg-batch"]["bytes_sent"] == 12 * ring
    assert facts["refusal"] == ("sequence parallelism over 2 processes needs a head count divisible by 2, "
                                "but the model has 3 attention heads")


def test_the_command_line_under_torchrun_writes_the_single_process_image(tmp_path, monkeypatch):
    from PIL import Image

    from rectiflux import cli

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    prompt = "a large red circle on the left on a white background"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", XDG_CACHE_HOME=str(tmp_path / "cache"))
    assert cli.main(["generate", prompt, "--seed", "3", "-o", str(tmp_path / "one.png")]) == 0
    one = np.asarray(Image.open(tmp_path / "one.png"), dtype=int)
    for backend in ([], ["ring"]):
        out = tmp_path / f"split-{backend}.png"
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "rectiflux", "generate", prompt, "--seed", "3", "--sequence-parallel", *backend,
                               "-o", str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("wrote ") == 1  # the first process writes
        split = np.asarray(Image.open(out), dtype=int)
        assert np.abs(split - one).max() <= 1  # 8-bit rounding of images equal to ~1e-6
    assert cli.main(["generate", prompt, "--sequence-parallel", "-o", str(tmp_path / "alone.png")]) == 2
