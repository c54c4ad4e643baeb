"""`rectiflux batch`: every line once, seeds by line number, bad lines skipped, resumable, shared over torchrun's
ranks with the same images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rectiflux import cli

PROMPTS = """a large red circle on the left on a white background
# a comment, then a blank line

{"prompt": "a small blue square on the right on a black background", "seed": 5, "steps": 4}
{"prompt": "x", "steps": 0}
{"prompt": "a large green triangle in the center on a gray background", "num-images": 2}
{"model": "other", "prompt": "y", "dtype": "bfloat16"}
not json {
"""


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def manifest(out: Path) -> dict[int, dict]:
    return {e["line"]: e for e in map(json.loads, (out / "manifest.jsonl").read_text().splitlines())}


def test_lines_seeds_bad_lines_and_resume(tmp_path, capsys):
    (tmp_path / "p.txt").write_text(PROMPTS)
    out = tmp_path / "out"
    assert cli.main(["batch", str(tmp_path / "p.txt"), "--out", str(out), "--seed", "100"]) == 1
    err = capsys.readouterr().err
    assert "line 5: steps: the number of steps must be at least 1" in err
    assert "line 7: model: the line names the model other" in err
    assert "line 8: not a JSON object" not in err  # a line not starting with { is a prompt
    entries = manifest(out)
    assert sorted(entries) == [1, 4, 5, 6, 7, 8]
    assert "error" in entries[5] and "error" in entries[7]
    assert entries[1]["seed"] == 101 and entries[4]["seed"] == 5 and entries[6]["seed"] == 106
    assert entries[6]["images"] == ["line-00006-1.png", "line-00006-2.png"]

    # each image is the one `rectiflux generate` makes with that seed
    assert cli.main(["generate", "a large red circle on the left on a white background", "--seed", "101", "-o",
                     str(tmp_path / "one.png")]) == 0
    np.testing.assert_array_equal(pixels(out / "line-00001.png"), pixels(tmp_path / "one.png"))
    assert cli.main(["generate", "a large green triangle in the center on a gray background", "--seed", "107",
                     "-o", str(tmp_path / "two.png")]) == 0
    np.testing.assert_array_equal(pixels(out / "line-00006-2.png"), pixels(tmp_path / "two.png"))

    # re-running makes nothing again; a lost image is made again alone
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    (out / "line-00004.png").unlink()
    for stale in (".line-00004.png.x1.tmp", ".manifest.jsonl.x2.tmp"):  # what a killed run leaves
        (out / stale).write_bytes(b"half")
    assert cli.main(["batch", str(tmp_path / "p.txt"), "--out", str(out), "--seed", "100"]) == 1
    assert not list(out.glob(".*.tmp"))
    assert "made 1 image " in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert {k for k in after if after[k] != before.get(k)} == {"line-00004.png"}


def test_a_png_recipe_is_a_line(tmp_path):
    source = tmp_path / "source.png"
    assert cli.main(["generate", "a large red circle on the left on a white background", "--seed", "1", "-o",
                     str(source)]) == 0
    assert cli.main(["img2img", "a large blue circle on the left on a white background", "--image", str(source),
                     "--strength", "0.7", "--seed", "3", "-o", str(tmp_path / "made.png")]) == 0
    with Image.open(tmp_path / "made.png") as im:
        recipe = dict(im.text)
    (tmp_path / "lines.jsonl").write_text(json.dumps(recipe) + "\n")
    assert cli.main(["batch", str(tmp_path / "lines.jsonl"), "--out", str(tmp_path / "out")]) == 0
    np.testing.assert_array_equal(pixels(tmp_path / "out" / "line-00001.png"), pixels(tmp_path / "made.png"))


def test_torchrun_shares_the_lines_and_a_killed_run_resumes(tmp_path):
    lines = [f'{{"prompt": "a large red circle on the left on a white background", "steps": {40 + i}}}'
             for i in range(7)]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", XDG_CACHE_HOME=str(tmp_path / "cache"))
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "rectiflux", "batch",
           str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "shared")]
    proc = subprocess.run(run, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(manifest(tmp_path / "shared")) == list(range(1, 8))  # every line once
    assert not list((tmp_path / "shared").glob("manifest.rank*"))

    # one process, killed once its first images are written, then run again: the images of the shared run
    single = [sys.executable, "-m", "rectiflux", "batch", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "one")]
    first = subprocess.Popen(single, env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((tmp_path / "one").glob("line-*.png"))) < 2 and first.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert len(list((tmp_path / "one").glob("line-*.png"))) < 7  # it was killed mid-batch
    assert cli.main(single[3:]) == 0
    assert sorted(manifest(tmp_path / "one")) == list(range(1, 8))
    assert not list((tmp_path / "one").glob(".*.tmp"))
    for k in range(1, 8):
        name = f"line-{k:05d}.png"
        np.testing.assert_array_equal(pixels(tmp_path / "one" / name), pixels(tmp_path / "shared" / name))


@pytest.mark.ray
@pytest.mark.xdist_group("ray")  # one local Ray instance at a time
def test_ray_data_makes_the_same_images(tmp_path):
    pytest.importorskip("ray", reason="Ray is the rectiflux[ray] extra (the test extra installs it)")
    lines = [f'{{"prompt": "a small green square at the top on a black background", "steps": {3 + i}}}'
             for i in range(5)] + ['{"prompt": "x", "steps": -1}']
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", XDG_CACHE_HOME=str(tmp_path / "cache"))
    for name, extra in (("local", []), ("ray", ["--ray", "--ray-workers", "2"])):
        proc = subprocess.run([sys.executable, "-m", "rectiflux", "batch", str(tmp_path / "p.jsonl"), "--out",
                               str(tmp_path / name), *extra], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr[-3000:]  # the bad last line
        assert "line 6: steps" in proc.stderr and "made 5 images" in proc.stdout
    assert manifest(tmp_path / "ray") == manifest(tmp_path / "local")
    for k in range(1, 6):
        name = f"line-{k:05d}.png"
        np.testing.assert_array_equal(pixels(tmp_path / "ray" / name), pixels(tmp_path / "local" / name))
