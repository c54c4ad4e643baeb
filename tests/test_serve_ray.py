"""`rectiflux serve --ray-replicas 2` on a local Ray: two model workers behind Ray Serve's proxy, one history."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rectiflux import cli

PROMPT = "a large red circle on the left on a white background"
pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray")]  # one local Ray instance at a time


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")).copy()


def test_two_replicas_share_the_work_and_the_history(tmp_path, monkeypatch):
    pytest.importorskip("ray.serve", reason="Ray Serve is the rectiflux[ray] extra (the test extra installs it)")
    import httpx

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "rectiflux", "serve", "--ray-replicas", "2", "--port", str(port),
                             "--data", str(tmp_path / "data")], env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("serving on" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}"
        results: dict[int, httpx.Response] = {}

        def post(seed: int) -> None:
            results[seed] = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": seed,
                                                                       "steps": 200}, timeout=120)

        threads = [threading.Thread(target=post, args=(seed,)) for seed in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r.status_code == 200 for r in results.values()), [r.text for r in results.values()]
        assert cli.main(["generate", PROMPT, "--seed", "2", "--steps", "200", "-o", str(tmp_path / "cli.png")]) == 0
        np.testing.assert_array_equal(pixels(base64.b64decode(results[2].json()["images"][0])),
                                      pixels((tmp_path / "cli.png").read_bytes()))

        # a job runs on one replica; cancelling it through either one stops it
        job = httpx.post(f"{url}/api/jobs", json={"prompt": PROMPT, "steps": 100000}).json()
        while httpx.get(f"{url}/api/jobs/{job['id']}").json()["state"] != "running":
            time.sleep(0.05)
        for _ in range(4):
            httpx.post(f"{url}/api/jobs/{job['id']}/cancel")
        deadline = time.monotonic() + 30
        while (state := httpx.get(f"{url}/api/jobs/{job['id']}").json()["state"]) != "cancelled":
            assert state == "running" and time.monotonic() < deadline
            time.sleep(0.05)

        def workers() -> set[str]:
            with closing(sqlite3.connect(tmp_path / "data" / "history.sqlite3")) as db:
                return {row[0] for row in db.execute("SELECT worker FROM jobs")}

        # both replicas made images. Ray routes each request to the shorter queue of two replicas drawn at random
        # (ties either way), so one replica can take a whole round now and then: more rounds until it has not
        for again in range(1, 5):
            if len(workers()) == 2:
                break
            seeds = [10 * again + seed for seed in range(4)]
            threads = [threading.Thread(target=post, args=(seed,)) for seed in seeds]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert all(results[seed].status_code == 200 for seed in seeds), [results[s].text for s in seeds]
        assert len(workers()) == 2, workers()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        ray_cli = Path(sys.executable).with_name("ray")  # Ray's own processes, should the driver have left any
        if ray_cli.exists():
            subprocess.run([str(ray_cli), "stop", "--force"], env=env, capture_output=True, timeout=60)
