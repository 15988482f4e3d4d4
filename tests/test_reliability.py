"""Reliability guarantees (README, RELIABILITY): bad input, parameter floods, long runs, load failures, threads."""

import gc
import logging
import random
import threading
import time

import pytest
import torch

from scope_streamdiffusion import StreamDiffusionPipeline
from scope_streamdiffusion.engine import CfgType, ModelLoadError

SIZE = dict(width=64, height=64, use_tiny_vae=False)


@pytest.fixture(scope="module")
def pipe(tiny_sd15):
    return StreamDiffusionPipeline(model_id=str(tiny_sd15), num_inference_steps=2, **SIZE)


def valid(out, frames=1):
    video = out["video"]
    return video.shape == (frames, 64, 64, 3) and torch.isfinite(video).all() and 0 <= video.min() and video.max() <= 1


GOOD_FRAMES = {
    "uint8 (1,H,W,3)": torch.randint(0, 255, (1, 48, 80, 3), dtype=torch.uint8),
    "1x1": torch.randint(0, 255, (1, 1, 3), dtype=torch.uint8),
    "37x53": torch.rand(37, 53, 3),
    "4096x4096": torch.randint(0, 255, (4096, 4096, 3), dtype=torch.uint8),
    "grey 1-channel": torch.rand(40, 40, 1),
    "grey 2-D": torch.rand(40, 40),
    "RGBA": torch.rand(40, 40, 4),
    "channels-first": torch.rand(3, 40, 60),
    "non-contiguous": torch.rand(60, 40, 3).transpose(0, 1),
    "float outside [0,1]": torch.randn(40, 40, 3) * 5,
    "NaN and Inf": torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(40, 40, 1),
    "int16": torch.randint(0, 255, (40, 40, 3), dtype=torch.int16),
    "float64": torch.rand(40, 40, 3, dtype=torch.float64),
    "numpy": torch.rand(40, 40, 3).numpy(),
    "numpy, negative strides (OpenCV's BGR->RGB)": (torch.rand(40, 40, 3).numpy() * 255).astype("uint8")[..., ::-1],
    "numpy, flipped upside down": torch.rand(40, 40, 3).numpy()[::-1],
}
BAD_FRAMES = {
    "empty list": [],
    "wrong rank": [torch.rand(2, 2, 40, 40, 3)],
    "two channels": [torch.rand(40, 40, 2)],
    "zero size": [torch.rand(0, 40, 3)],
    "complex": [torch.rand(40, 40, 3, dtype=torch.complex64)],
}


@pytest.mark.parametrize("name", list(GOOD_FRAMES))
def test_odd_frames_are_handled(pipe, name):
    assert valid(pipe(video=[GOOD_FRAMES[name]]))


@pytest.mark.parametrize("video", ["numpy stack", "list of a stack", "list of a numpy stack"])
def test_several_frames_in_one_array_are_several_frames(pipe, video):
    stack = torch.randint(0, 255, (2, 40, 40, 3), dtype=torch.uint8)
    given = {"numpy stack": stack.numpy(), "list of a stack": [stack], "list of a numpy stack": [stack.numpy()]}
    assert valid(pipe(video=given[video]), frames=2)


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_unusable_frames_raise_one_clear_error_and_keep_the_state(pipe, name):
    pipe(video=[GOOD_FRAMES["37x53"]])
    before = pipe.engine.state.latents.clone()
    with pytest.raises(ValueError, match="frame|frames|image"):
        pipe(video=BAD_FRAMES[name])
    assert torch.equal(pipe.engine.state.latents, before)
    assert valid(pipe(video=[GOOD_FRAMES["37x53"]]))


def random_value(rng):
    return rng.choice([
        None, "0.5", "abc", [1, 2], {"a": 1}, -1, 0, 7, 500, 2.0, -3.5, 1e9, float("nan"), True, "",
        "x" * 10_000, rng.random(), rng.randint(-5, 60),
        # Malformed forms of the structured values: transitions, weights, compel syntax.
        {"target_prompts": [{"text": "a fox", "weight": 1}], "num_steps": rng.choice(["abc", float("nan"), [3], 1e12])},
        [{"text": "a", "weight": float("inf")}, {"text": "b", "weight": 1e308}], '("a", "b").blend(0.7)', "()",
    ])


FUZZ_KEYS = ["strength", "guidance_scale", "delta", "num_inference_steps", "seed", "cfg_type", "t_index_list",
             "use_denoising_batch", "do_add_noise", "similar_image_filter", "similar_image_filter_threshold",
             "similar_image_filter_max_skip_frame", "negative_prompt", "prompt", "prompts",
             "prompt_interpolation_method", "transition", "unknown_key", "init_cache", "lora_scales"]


def test_fuzzed_parameter_updates_never_break_the_stream(tiny_sd15, caplog):
    pipe = StreamDiffusionPipeline(model_id=str(tiny_sd15), **SIZE)
    rng = random.Random(1234)
    frame = GOOD_FRAMES["37x53"]
    updates = 0
    with caplog.at_level(logging.WARNING, logger="scope_streamdiffusion"):
        for _ in range(500):
            for _ in range(3):
                pipe.update(**{rng.choice(FUZZ_KEYS): random_value(rng)})
                updates += 1
            key = rng.choice(FUZZ_KEYS)
            value = rng.choice(["full", "self", "initialize", "none"]) if key == "cfg_type" else random_value(rng)
            updates += 1
            assert valid(pipe(video=[frame], **{key: value})), (key, value)
    assert updates >= 2000
    # One warning per parameter and kind of problem, not one per update.
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) < 60


def test_extreme_settings_give_valid_frames_and_the_stream_heals_after(tiny_sd15):
    """Guidance 20, delta 5 and strength past 1 over 10 steps overflow the latents (1e19): the frames
    stay in [0, 1] (never NaN), and once the settings are sane again, within the steps' calls, the
    stream gives exactly the frames it gave before."""
    pipe = StreamDiffusionPipeline(model_id=str(tiny_sd15), prompt="a fox", num_inference_steps=10, cfg_type="self",
                                   **SIZE)
    frame = GOOD_FRAMES["37x53"]
    sane = dict(guidance_scale=1.2, delta=1.0, strength=0.8)
    for _ in range(12):
        before = pipe(video=[frame], **sane)
    for _ in range(12):  # the overflowed frames reach the output after the steps' calls
        assert valid(pipe(video=[frame], guidance_scale=20.0, delta=5.0, strength=1.2))
    assert pipe.engine.state.latents.abs().max() > 1e6
    outs = [pipe(video=[frame], **sane) for _ in range(10)]
    assert all(valid(o) for o in outs)
    assert torch.equal(outs[-1]["video"], before["video"])


@pytest.mark.slow
def test_soak_2000_frames_without_growth(tiny_sd15):
    pipe = StreamDiffusionPipeline(model_id=str(tiny_sd15), **SIZE)
    frame = GOOD_FRAMES["uint8 (1,H,W,3)"]
    prompts = [f"a painting of scene {i}" for i in range(100)]

    def run(start, stop):
        for i in range(start, stop):
            params = {"prompt": prompts[i % len(prompts)], "strength": 0.3 + 0.5 * (i % 7) / 7,
                      "num_inference_steps": 1 + (i // 50) % 2, "guidance_scale": 1.0 + (i % 3)}
            assert valid(pipe(video=[frame], **params))

    run(0, 400)  # warm-up: every prompt seen, caches full
    gc.collect()
    objects = len(gc.get_objects())
    tensors = sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))
    run(400, 2000)
    gc.collect()
    assert len(gc.get_objects()) - objects < 500
    assert sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)) - tensors <= 8
    assert pipe.engine.prompt_encoder.cache_len <= pipe.engine.prompt_encoder.cache_size


def test_settings_updated_from_another_thread_are_never_half_applied(tiny_sd15):
    pipe = StreamDiffusionPipeline(model_id=str(tiny_sd15), **SIZE)
    engine = pipe.engine
    a = dict(num_inference_steps=1, guidance_scale=1.0, cfg_type=CfgType.NONE, prompts=(("a dog", 1.0),))
    b = dict(num_inference_steps=2, guidance_scale=2.5, cfg_type=CfgType.FULL, prompts=(("a cat", 1.0),))
    stop = threading.Event()

    def flip():
        while not stop.is_set():
            engine.update(**a)
            time.sleep(0.001)  # a UI thread sends updates between frames; a spin would only starve the GIL
            engine.update(**b)
            time.sleep(0.001)

    thread = threading.Thread(target=flip)
    thread.start()
    seen_steps = set()
    try:
        for _ in range(40):
            assert valid(pipe(video=[GOOD_FRAMES["37x53"]]))
            seen = engine._prepared.settings
            combo = {k: getattr(seen, k) for k in a}
            assert combo in (a, b)
            seen_steps.add(seen.num_inference_steps)
    finally:
        stop.set()
        thread.join()
    assert seen_steps == {1, 2}  # both settings really ran, switching under the calls


def test_a_lora_that_does_not_fit_fails_cleanly(tiny_sd15, tiny_sdxl, tmp_path):
    from scope_streamdiffusion.testing.tiny_models import build_tiny_lcm_lora

    lora = build_tiny_lcm_lora(tiny_sdxl, tmp_path / "sdxl-lora")
    gc.collect()
    unets_before = sum(1 for o in gc.get_objects() if type(o).__name__ == "UNet2DConditionModel")
    with pytest.raises(ModelLoadError, match="(?s)LoRA.*Fix"):
        StreamDiffusionPipeline(model_id=str(tiny_sd15), use_lcm_lora=True, lcm_lora_id=str(lora), **SIZE)
    gc.collect()
    # Nothing half-loaded stays alive.
    assert sum(1 for o in gc.get_objects() if type(o).__name__ == "UNet2DConditionModel") <= unets_before


def test_out_of_memory_during_a_call_frees_the_stream_and_says_why(tiny_sd15):
    pipe = StreamDiffusionPipeline(model_id=str(tiny_sd15), num_inference_steps=2, **SIZE)
    frame = GOOD_FRAMES["37x53"]
    pipe(video=[frame])
    assert pipe.engine.state.primed

    def out_of_memory(_module, _args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handle = pipe.engine.models.unet.register_forward_pre_hook(out_of_memory)
    try:
        with pytest.raises(torch.cuda.OutOfMemoryError, match="(?s)out of memory.*64x64.*Fix"):
            pipe(video=[frame])
    finally:
        handle.remove()
    assert not pipe.engine.state.primed  # the half-advanced buffers were dropped
    assert valid(pipe(video=[frame]))  # and the pipeline works again once memory is back


def test_out_of_memory_while_loading_names_the_model_and_vram():
    from scope_streamdiffusion.engine.models import _load_error

    err = _load_error("model", "stabilityai/sdxl-turbo", torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert isinstance(err, ModelLoadError)
    assert "stabilityai/sdxl-turbo" in str(err) and "GB" in str(err) and "Fix" in str(err)


def test_offline_mode_does_not_turn_every_load_error_into_a_missing_model(monkeypatch):
    """With HF_HUB_OFFLINE set (as in Scope without internet), a model that is there but fails
    afterwards must say what failed, not that the hub is unreachable."""
    from scope_streamdiffusion.engine.models import _load_error

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = str(_load_error("model", "/models/sd-turbo", AssertionError("only works for bfloat16 weights")))
    assert "hub" not in err and "bfloat16" in err and "Fix" in err
    # What a model that is not cached raises offline: diffusers 0.36 / huggingface_hub 0.36 (Scope's
    # pins), the latest releases, and a TAESD folder id; the hub's exception may be only the cause.
    pinned = OSError("Cannot load model stabilityai/sd-turbo: model is not cached locally and an error occurred "
                     "while trying to fetch metadata from the Hub. Please check out the root cause in the stacktrace above.")
    latest = OSError("Cannot load model stabilityai/sd-turbo: the model is not fully cached locally (Cannot find an "
                     "appropriate cached snapshot folder for the specified revision on the local disk and outgoing "
                     "traffic has been disabled.)")
    taesd = OSError("madebyollin/taesd does not appear to have a file named config.json.")
    try:
        raise RuntimeError("something generic") from ConnectionError("Max retries exceeded with url: /api/models")
    except RuntimeError as exc:
        chained = exc
    for exc in (pinned, latest, taesd, chained):
        assert "HF_HUB_OFFLINE is set" in str(_load_error("model", "stabilityai/sd-turbo", exc)), exc


def test_a_corrupt_model_fails_cleanly_without_leftovers(tiny_sd15, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd15, broken)
    next((broken / "vae").glob("*.safetensors")).write_bytes(b"\x00not safetensors" * 10)
    gc.collect()
    before = sum(1 for o in gc.get_objects() if type(o).__name__ in ("UNet2DConditionModel", "CLIPTextModel"))
    with pytest.raises(ModelLoadError, match="Fix"):
        StreamDiffusionPipeline(model_id=str(broken), **SIZE)
    gc.collect()
    after = sum(1 for o in gc.get_objects() if type(o).__name__ in ("UNet2DConditionModel", "CLIPTextModel"))
    assert after <= before  # components loaded before the corrupt one are not kept alive
