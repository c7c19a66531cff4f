"""`airatings weights pull`: torchvision's weights into the torch cache through a real HTTP
server on loopback standing in for the download host; a wrong hash or a file that is not the
backbone's weights leaves nothing in the cache."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import AIRATINGS, BASELINE, REPO


@pytest.fixture
def host(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """(base URL, served directory, request paths seen) of a loopback file server."""
    root = tmp_path / "served"
    root.mkdir()
    seen: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            seen.append(self.path)
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", root, seen
    finally:
        server.shutdown()
        server.server_close()


def _state_bytes(backbone: str) -> bytes:
    buf = io.BytesIO()
    torch.save(torchvision.models.get_model(backbone, weights=None).state_dict(), buf)
    return buf.getvalue()


def _pull(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "TORCH_HOME": str(tmp_path / "torch"),
        "AIR_DATA_DIR": str(tmp_path / "data"),
        "AIR_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
        "AIR_LOG_LEVEL": "WARNING",
    }
    return subprocess.run(
        [AIRATINGS, "weights", "pull", *args, "--config", str(BASELINE)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _cache_files(tmp_path: Path) -> list[Path]:
    root = tmp_path / "torch"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_a_wrong_hash_is_refused_and_nothing_is_written(tmp_path, host):
    base, root, seen = host
    name = os.path.basename(torchvision.models.MobileNet_V3_Small_Weights.DEFAULT.url)
    (root / name).write_bytes(_state_bytes("mobilenet_v3_small"))  # right shape, wrong bytes
    out = _pull(tmp_path, "mobilenet_v3_small", "--mirror", base)
    assert out.returncode == 2, out.stderr
    assert "invalid hash value" in out.stderr and name[-12:-4] in out.stderr
    assert seen == [f"/{name}"]
    assert _cache_files(tmp_path) == []


def test_a_checked_file_lands_in_the_torch_cache_and_a_second_pull_is_a_no_op(tmp_path, host):
    base, root, seen = host
    data = _state_bytes("mobilenet_v3_small")
    name = f"mobilenet_v3_small-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    (root / name).write_bytes(data)
    out = _pull(tmp_path, "mobilenet_v3_small", "--url", f"{base}/{name}", "--json")
    assert out.returncode == 0, out.stderr
    final = tmp_path / "torch" / "hub" / "checkpoints" / name
    assert _cache_files(tmp_path) == [final] and final.read_bytes() == data
    again = _pull(tmp_path, "mobilenet_v3_small", "--url", f"{base}/{name}", "--json")
    assert again.returncode == 0 and '"already_present"' in again.stdout
    assert len(seen) == 1


def test_a_file_that_is_not_the_backbones_weights_is_refused(tmp_path, host):
    base, root, _ = host
    data = _state_bytes("resnet18")  # a valid hash for its name, but resnet18's tensors
    name = f"mobilenet_v3_small-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    (root / name).write_bytes(data)
    out = _pull(tmp_path, "mobilenet_v3_small", "--url", f"{base}/{name}")
    assert out.returncode == 2 and "not torchvision mobilenet_v3_small" in out.stderr
    assert _cache_files(tmp_path) == []


def test_missing_file_is_bad_input_and_a_dead_host_is_transient(tmp_path, host):
    base, _, _ = host
    missing = _pull(tmp_path, "resnet18", "--mirror", base)
    assert missing.returncode == 2 and "HTTP 404" in missing.stderr
    dead = _pull(tmp_path, "resnet18", "--mirror", "http://127.0.0.1:9")
    assert dead.returncode == 75, dead.stderr
    unchecked = _pull(tmp_path, "--url", f"{base}/weights.pth")
    assert unchecked.returncode == 2 and "no sha256 prefix" in unchecked.stderr
    assert _cache_files(tmp_path) == []
