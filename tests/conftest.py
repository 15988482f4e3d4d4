"""Tiny random-weight models, built once per session and loaded through the real model_id path."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from scope_streamdiffusion.testing.tiny_models import (  # noqa: E402
    build_tiny_lcm_lora,
    build_tiny_model,
    build_tiny_taesd,
)

# One intra-op thread: the tiny models gain nothing from more, and when the cores are busy
# (parallel test runs) OpenMP threads spin-wait and make every call ~100x slower.
torch.set_num_threads(int(os.environ.get("SCOPE_SD_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd15", "sd15")


@pytest.fixture(scope="session")
def tiny_sd15_v(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd15-v", "sd15", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", "sdxl")


@pytest.fixture(scope="session")
def tiny_taesd(tmp_path_factory):
    return build_tiny_taesd(tmp_path_factory.mktemp("models") / "tiny-taesd")


@pytest.fixture(scope="session")
def tiny_lcm_lora(tmp_path_factory, tiny_sd15):
    return build_tiny_lcm_lora(tiny_sd15, tmp_path_factory.mktemp("models") / "tiny-lcm-lora")


@pytest.fixture(scope="session")
def sd15_models(tiny_sd15):
    from scope_streamdiffusion.engine import load_models

    return load_models(str(tiny_sd15), device=torch.device("cpu"), dtype=torch.float32, use_tiny_vae=False)


@pytest.fixture(scope="session")
def sdxl_models(tiny_sdxl):
    from scope_streamdiffusion.engine import load_models

    return load_models(str(tiny_sdxl), device=torch.device("cpu"), dtype=torch.float32, use_tiny_vae=False)


def make_frames(count, size=64, seed=0):
    """Distinct smooth random test frames, each (1, 3, H, W) in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    frames = []
    for _ in range(count):
        base = torch.rand(1, 3, size // 8, size // 8, generator=gen)
        frames.append(torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False))
    return frames
