"""The README's commands and `rectiflux --help`'s examples run as written, in order, in a fresh folder.

The family's commands name Hugging Face repos: a Hugging Face cache whose snapshots are tiny random models of each
kind stands in for the real one, so the lines themselves run unchanged. Only the training recipe (70 minutes here)
gets a few step counts appended.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_models import make_tiny_flux_folder, make_tiny_redux_folder

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("rectiflux")
RECTIFLUX = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "rectiflux"]
TINY_DEFAULTS = {"steps": 2, "width": 32, "height": 32, "max_sequence_length": 16}
QUICK_TRAINING = ["--ae-steps", "2", "--flux-steps", "2", "--distill-steps", "1", "--batch-size", "2",
                  "--bank-size", "4", "--checkpoint-every", "2", "--log-every", "1", "--sample-every", "0"]


def commands(text: str) -> list[list[str]]:
    """The shell commands of `text`: lines starting with `rectiflux ` or `python3 -c`, continuations joined,
    comments dropped."""
    text = text.replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("rectiflux ", "python3 -c ")):
            found.append(shlex.split(line, comments=True))
    return found


def readme_section(title: str) -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return "\n".join(re.findall(r"```bash\n(.*?)```", section, flags=re.S))


def run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    if argv[0] == "rectiflux":
        argv = [*RECTIFLUX, *argv[1:]]
    elif argv[0] == "python3":
        argv = [sys.executable, *argv[1:]]
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return dict(os.environ, XDG_CACHE_HOME=str(tmp_path_factory.mktemp("cache")), HF_HUB_OFFLINE="1")


def test_command_line_section(env, tmp_path):
    lines = commands(readme_section("Command line"))
    assert len(lines) >= 8 and any(a[:2] == ["rectiflux", "inpaint"] for a in lines)
    for argv in lines:
        run(argv, tmp_path, env)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"square.png", "mask.png", "again.png", "int8.png", "cached.png", "streamed.png"} <= names
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "again.png")),
                                  np.asarray(Image.open(tmp_path / "square.png")))


def test_help_examples(env, tmp_path):
    proc = subprocess.run([*RECTIFLUX, "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    lines = commands(proc.stdout.split("examples", 1)[1])
    assert len(lines) >= 5
    for argv in lines:
        run(argv, tmp_path, env)
    assert {"circle.png", "blue.png", "mask.png", "square.png", "again.png"} <= {p.name for p in tmp_path.iterdir()}


def test_family_section_against_a_cache_of_tiny_models(env, tmp_path, tmp_path_factory):
    hub = tmp_path_factory.mktemp("hub")
    models = {"FLUX.1-Fill-dev": "fill", "FLUX.1-Canny-dev": "control", "FLUX.1-Kontext-dev": "kontext",
              "FLUX.1-dev": "flux"}
    for repo, variant in models.items():
        snapshot = hub / f"models--black-forest-labs--{repo}" / "snapshots" / "0"
        make_tiny_flux_folder(snapshot, variant=variant)
        (snapshot / "rectiflux.json").write_text(json.dumps(TINY_DEFAULTS))
    make_tiny_redux_folder(hub / "models--black-forest-labs--FLUX.1-Redux-dev" / "snapshots" / "0")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "room.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "edges.png")
    mask = Image.new("L", (32, 32))
    mask.paste(255, (8, 8, 24, 24))
    mask.save(tmp_path / "mask.png")
    lines = commands(readme_section("The FLUX.1 family"))
    assert [a[1] for a in lines] == ["fill", "control", "edit", "generate"]
    for argv in lines:
        if argv[1] == "edit":  # the tiny model at Kontext's trained resolution would take minutes
            argv = [*argv, "--keep-reference-size"]
        run([*argv, "-o", f"{argv[1]}.png"], tmp_path, {**env, "HF_HUB_CACHE": str(hub)})
    assert {"fill.png", "control.png", "edit.png", "generate.png"} <= {p.name for p in tmp_path.iterdir()}


def test_training_section(env, tmp_path):
    lines = commands(readme_section("The embedded model and the trainer"))
    assert [a[1] for a in lines] == ["train", "eval"]
    train, evaluate = lines
    proc = run([*train, *QUICK_TRAINING], tmp_path, env)
    assert proc.stderr == ""  # no bar off a terminal, and none of transformers' "Writing model shards" bars
    assert "all" in run([*evaluate, "--per-pair", "1"], tmp_path, env).stdout


def test_server_section_snippet_against_the_command(env, tmp_path):
    """The section's `rectiflux serve` (on a free port instead of 8188) answers the section's OpenAI snippet."""
    import socket
    import time

    pytest.importorskip("openai")
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Server, web page, OpenAI and AUTOMATIC1111 APIs\n", 1)[1].split("\n## ", 1)[0]
    serve = re.search(r"\.venv/bin/(rectiflux serve[^\n`]*)", section)[1].split()
    snippet = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([*RECTIFLUX, *serve[1:], "--port", str(port), "--data", str(tmp_path / "data")],
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()  # printed once the model is loaded and the port is open
        assert f":{port}/" in line, line
        code = snippet.replace("http://127.0.0.1:8188", f"http://127.0.0.1:{port}") + \
            "\nimport base64\nopen('readme.png', 'wb').write(base64.b64decode(image.data[0].b64_json))\n"
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, timeout=120)
        assert time.monotonic() - started < 120
        assert Image.open(tmp_path / "readme.png").size == (64, 64)
    finally:
        proc.kill()
        proc.wait()


def test_batch_section(env, tmp_path):
    lines = commands(readme_section("Many images, many machines"))
    assert lines and lines[0][:2] == ["rectiflux", "batch"]
    (tmp_path / "prompts.txt").write_text("a large red circle on the left on a white background\n"
                                          "a small blue square on the right on a black background\n")
    for argv in lines:
        run(argv, tmp_path, env)
    assert len((tmp_path / "shots" / "manifest.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in (tmp_path / "shots").glob("*.png")) == ["line-00001.png", "line-00002.png"]
