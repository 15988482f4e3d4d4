"""Tests of the random-weight model builders (scope_streamdiffusion.testing)."""

from __future__ import annotations

import importlib
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the hub, even by accident

import sys
import threading
from pathlib import Path

import pytest
import torch

try:
    importlib.import_module("scope_streamdiffusion.testing")
except ImportError:  # running from a plain checkout without an editable install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from diffusers import (  # noqa: E402
    AutoencoderKL,
    AutoencoderTiny,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)
from safetensors.torch import load_file  # noqa: E402
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

from scope_streamdiffusion.testing import architectures as arch  # noqa: E402
from scope_streamdiffusion.testing import tiny_models as tm  # noqa: E402

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" with real CLIP


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> Path:
    return tm.build_tiny_model(tmp_path_factory.mktemp("tiny") / "sd15", "sd15")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    return tm.build_tiny_model(tmp_path_factory.mktemp("tiny") / "sdxl", "sdxl")


@pytest.fixture(scope="session")
def tiny_models(tiny_sd15, tiny_sdxl) -> dict[str, Path]:
    return {"sd15": tiny_sd15, "sdxl": tiny_sdxl}


def _unet_inputs(unet: UNet2DConditionModel) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]),
        }
    return (sample, torch.tensor([500]), hidden), kwargs


@torch.no_grad()
def _unet_out(unet: UNet2DConditionModel) -> torch.Tensor:
    args, kwargs = _unet_inputs(unet)
    return unet(*args, **kwargs).sample


# --------------------------------------------------------------------------- tokenizer


def test_clip_tokenizer_matches_real_clip_ids(tmp_path):
    tok = CLIPTokenizer.from_pretrained(tm.clip_tokenizer_files(tmp_path / "tok"))
    assert len(tok) == tm.CLIP_VOCAB_SIZE
    assert tok("a photo of a cat").input_ids == CAT_IDS
    padded = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[7:] == [49407] * 70


def test_clip_tokenizer_openclip_pad(tmp_path):
    tok = CLIPTokenizer.from_pretrained(tm.clip_tokenizer_files(tmp_path / "tok", pad_token="!"))
    assert tok.pad_token == "!" and tok.pad_token_id == 0
    assert tok("a photo of a cat").input_ids == CAT_IDS


def test_missing_bpe_file_raises_clear_error(monkeypatch):
    monkeypatch.setattr(tm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="pip install open_clip_torch --no-deps"):
        tm.find_clip_bpe_file()


# --------------------------------------------------------------------------- tiny pipelines


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tiny_pipeline_loads_and_generates(tiny_models, family):
    pipe = DiffusionPipeline.from_pretrained(tiny_models[family])
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8
    out = pipe(
        "a photo of a cat",
        num_inference_steps=1,
        height=64,
        width=64,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 3, 64, 64)
    assert torch.isfinite(out.images).all()


def test_tiny_sd15_components_load_per_subfolder(tiny_sd15):
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    assert unet.config.cross_attention_dim == 32
    assert AutoencoderKL.from_pretrained(tiny_sd15, subfolder="vae").config.latent_channels == 4
    te = CLIPTextModel.from_pretrained(tiny_sd15, subfolder="text_encoder")
    # Hub key layout, which transformers 4 needs (5 saves bare keys on its own).
    keys = load_file(tiny_sd15 / "text_encoder" / "model.safetensors").keys()
    assert all(k.startswith("text_model.") for k in keys)
    assert te.config.vocab_size == tm.CLIP_VOCAB_SIZE and te.config.hidden_size == 32
    tok = CLIPTokenizer.from_pretrained(tiny_sd15, subfolder="tokenizer")
    assert tok("a photo of a cat").input_ids == CAT_IDS
    sched = EulerDiscreteScheduler.from_pretrained(tiny_sd15, subfolder="scheduler")
    assert sched.config.beta_schedule == "scaled_linear"
    assert sched.config.prediction_type == "epsilon"
    pipe = DiffusionPipeline.from_pretrained(tiny_sd15)
    assert pipe.safety_checker is None and pipe.feature_extractor is None


def test_tiny_sdxl_layout(tiny_sdxl):
    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    assert unet.config.addition_embed_type == "text_time"
    assert unet.config.cross_attention_dim == 64
    te2 = CLIPTextModelWithProjection.from_pretrained(tiny_sdxl, subfolder="text_encoder_2")
    assert unet.config.projection_class_embeddings_input_dim == 6 * 8 + te2.config.projection_dim
    tok2 = CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder="tokenizer_2")
    assert tok2.pad_token == "!"
    pipe = DiffusionPipeline.from_pretrained(tiny_sdxl)
    assert pipe.config.force_zeros_for_empty_prompt is True
    assert pipe.vae.config.scaling_factor == pytest.approx(0.13025)


def test_scheduler_options(tmp_path):
    d = tm.build_tiny_model(
        tmp_path / "m", "sdxl", prediction_type="v_prediction", timestep_spacing="trailing"
    )
    sched = EulerDiscreteScheduler.from_pretrained(d, subfolder="scheduler")
    assert sched.config.prediction_type == "v_prediction"
    assert sched.config.timestep_spacing == "trailing"
    assert sched.config.num_train_timesteps == 1000
    assert (sched.config.beta_start, sched.config.beta_end) == (0.00085, 0.012)


def test_build_is_deterministic(tmp_path, tiny_sd15):
    again = tm.build_tiny_model(tmp_path / "again", "sd15", seed=0)
    other = tm.build_tiny_model(tmp_path / "other", "sd15", seed=1)
    ref = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet").state_dict()
    same = UNet2DConditionModel.from_pretrained(again, subfolder="unet").state_dict()
    diff = UNet2DConditionModel.from_pretrained(other, subfolder="unet").state_dict()
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert not all(torch.equal(ref[k], diff[k]) for k in ref)


def test_vae_downsamples_8x(tiny_sd15):
    vae = AutoencoderKL.from_pretrained(tiny_sd15, subfolder="vae")
    with torch.no_grad():
        latents = vae.encode(torch.randn(1, 3, 64, 96)).latent_dist.mode()
        assert latents.shape == (1, 4, 8, 12)
        assert vae.decode(latents).sample.shape == (1, 3, 64, 96)


def test_tiny_taesd_downsamples_8x(tmp_path):
    vae = AutoencoderTiny.from_pretrained(tm.build_tiny_taesd(tmp_path / "taesd"))
    assert arch.count_params(vae) < 50_000
    with torch.no_grad():
        latents = vae.encode(torch.randn(1, 3, 64, 64)).latents
        assert latents.shape == (1, 4, 8, 8)
        assert vae.decode(latents).sample.shape == (1, 3, 64, 64)


def test_taesd_default_config_is_real_architecture(tmp_path):
    path = tm.build_tiny_taesd(tmp_path / "taesd", taesd_default_config=True)
    vae = AutoencoderTiny.from_pretrained(path)
    assert arch.count_params(vae) == arch.PARAM_COUNTS["taesd"]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lora_changes_unet_after_fuse(tiny_models, tmp_path, family):
    lora_dir = tm.build_tiny_lcm_lora(tiny_models[family], tmp_path / "lora")
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file()
    pipe = DiffusionPipeline.from_pretrained(tiny_models[family])
    before = _unet_out(pipe.unet)
    # weight_name: diffusers 0.36 can't guess it offline (0.42 can)
    pipe.load_lora_weights(lora_dir, weight_name=tm.LORA_WEIGHT_NAME)
    with_adapter = _unet_out(pipe.unet)
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # drops the adapter layers; the fused weights stay
    fused = _unet_out(pipe.unet)
    assert (fused - before).abs().max() > 1e-2
    torch.testing.assert_close(fused, with_adapter, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- cache


def test_ensure_tiny_model_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SCOPE_STREAMDIFFUSION_CACHE", str(tmp_path))
    path = tm.ensure_tiny_model()
    assert path == tmp_path / "tiny-random"
    assert (path / "model_index.json").is_file()
    stamp = (path / "unet" / "config.json").stat().st_mtime_ns
    assert tm.ensure_tiny_model("tiny-random", cache_dir=tmp_path) == path
    assert (path / "unet" / "config.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-random"]
    with pytest.raises(ValueError):
        tm.ensure_tiny_model("no-such-model", cache_dir=tmp_path)


def test_ensure_tiny_model_concurrent_and_stale(tmp_path):
    results, errors = [], []

    def worker():
        try:
            results.append(tm.ensure_tiny_model("tiny-random-sdxl", cache_dir=tmp_path))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [tmp_path / "tiny-random-sdxl"] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-random-sdxl"]
    index = (tmp_path / "tiny-random-sdxl" / "model_index.json").read_text()
    assert "StableDiffusionXLPipeline" in index

    # A folder from an older builder version is replaced.
    (tmp_path / "tiny-random-sdxl" / tm._VERSION_FILE).write_text("0\n")
    tm.ensure_tiny_model("tiny-random-sdxl", cache_dir=tmp_path)
    assert tm._is_complete(tmp_path / "tiny-random-sdxl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-random-sdxl"]


# --------------------------------------------------------------------------- true architectures


def _meta_counts(kind: str) -> dict[str, int]:
    counts = {
        f"unet:{kind}": arch.count_params(arch.build_unet(kind, device="meta")),
        f"vae:{kind}": arch.count_params(arch.build_vae(kind, device="meta")),
        "taesd": arch.count_params(arch.build_taesd(kind, device="meta")),
    }
    encoders = arch.build_text_encoders(kind, device="meta")
    for i, enc in enumerate(encoders):
        counts[f"text_encoder{'_2' if i else ''}:{kind}"] = arch.count_params(enc)
    return counts


@pytest.mark.parametrize("kind", ["sd15", "sd21", "sdxl"])
def test_true_architecture_param_counts(kind):
    counts = _meta_counts(kind)
    assert len(counts) == (5 if kind == "sdxl" else 4)
    for key, n in counts.items():
        assert n == pytest.approx(arch.PARAM_COUNTS[key], rel=1e-3), key


def test_true_architecture_details():
    # Published sizes (notes): SD1.5 859.5M, SD2.1 865.9M, SDXL 2567M, VAE 83.7M, CLIP-L 123M.
    assert arch.PARAM_COUNTS["unet:sd15"] == pytest.approx(859.5e6, rel=1e-3)
    assert arch.PARAM_COUNTS["unet:sd21"] == pytest.approx(865.9e6, rel=1e-3)
    assert arch.PARAM_COUNTS["unet:sdxl"] == pytest.approx(2567e6, rel=1e-3)
    assert arch.PARAM_COUNTS["vae:sd15"] == pytest.approx(83.7e6, rel=1e-3)
    assert arch.PARAM_COUNTS["text_encoder:sd15"] == pytest.approx(123e6, rel=1e-3)
    te, te2 = arch.build_text_encoders("sdxl", device="meta", dtype=torch.float16)
    assert isinstance(te2, CLIPTextModelWithProjection) and te2.config.projection_dim == 1280
    assert te.config.hidden_act == "quick_gelu" and te2.config.hidden_act == "gelu"
    assert next(te2.parameters()).dtype == torch.float16
    assert arch.build_vae("sdxl", device="meta").config.scaling_factor == pytest.approx(0.13025)
    assert arch.build_vae("sdxl", device="meta").config.force_upcast
    assert arch.build_scheduler_config("sdxl-turbo")["timestep_spacing"] == "trailing"
    assert arch.build_scheduler("sd21").config.prediction_type == "v_prediction"
    with pytest.raises(ValueError):
        arch.build_unet("sd3", device="meta")
