"""The pipeline contract every caller (Scope, the CLI, library users) relies on."""

import logging
import shutil

import pytest
import torch

from scope_streamdiffusion import StreamDiffusionPipeline
from scope_streamdiffusion._scope import Requirements
from scope_streamdiffusion.engine import CfgType, ModelLoadError

SIZE = dict(width=64, height=64, use_tiny_vae=False)


@pytest.fixture
def pipe(tiny_sd15):
    return StreamDiffusionPipeline(model_id=str(tiny_sd15), prompt="a cat", **SIZE)


def uint8_frame(h=48, w=80, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(1, h, w, 3, generator=gen) * 255).to(torch.uint8)


def test_frames_in_any_layout_come_out_as_scope_wants(pipe):
    out = pipe(video=[uint8_frame()])["video"]
    assert out.shape == (1, 64, 64, 3) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    hw3 = torch.rand(100, 30, 3)  # (H, W, 3) float in [0, 1], odd size
    chw = torch.rand(3, 64, 64)  # channels-first
    out = pipe(video=[hw3, chw])["video"]
    assert out.shape == (2, 64, 64, 3)


@pytest.mark.parametrize("source", [(64, 64), (48, 80), (96, 128)], ids=["stream-size", "upscaled", "downscaled"])
def test_uint8_frames_skip_the_host_conversion_and_give_the_same_frames(tiny_sd15, monkeypatch, source):
    """Scope's frames (uint8, the source's size) go to the model step raw and are converted and
    resized there -- at the stream's size and at the size the stream starts with, at once. The
    frames that come out are the general path's, also with the filter on (the same input values, in
    channels-last layout: convolutions may round differently)."""
    kw = dict(model_id=str(tiny_sd15), num_inference_steps=2, frame_buffer_size=2, similar_image_filter=True,
              similar_image_filter_threshold=0.9, **SIZE)
    h, w = source
    inputs = [[uint8_frame(h, w, seed=s), uint8_frame(h, w, seed=s)] for s in (0, 1, 2, 2, 4)]
    inputs.append([uint8_frame(h, w, seed=3)])  # a short group, padded
    fast = StreamDiffusionPipeline(**kw)
    seen = []
    fast.engine.encode_images = lambda images, f=fast.engine.encode_images: seen.append(images.dtype) or f(images)
    got = [fast(video=v)["video"] for v in inputs]
    assert set(seen) == {torch.uint8}  # the stream's size or the size it starts with: raw at once
    monkeypatch.setenv("SCOPE_STREAMDIFFUSION_RAW_FRAMES", "0")  # the general path
    slow = StreamDiffusionPipeline(**kw)
    seen.clear()
    slow.engine.encode_images = lambda images, f=slow.engine.encode_images: seen.append(images.dtype) or f(images)
    want = [slow(video=v)["video"] for v in inputs]
    assert torch.uint8 not in seen
    assert fast.engine.frames_skipped == slow.engine.frames_skipped > 0  # the repeated group
    assert max((a - b).abs().max().item() for a, b in zip(got, want)) <= 1e-5
    frame = uint8_frame(h, w)
    assert torch.allclose(fast(video=[frame], strength=0.0)["video"], slow(video=[frame], strength=0.0)["video"],
                          atol=1e-6)


def test_sizes_that_change_every_call_take_the_general_path(pipe):
    """One graph per source size: a source whose size changes every call would capture one each time."""
    seen = []
    pipe.engine.encode_images = lambda images, f=pipe.engine.encode_images: seen.append(images.dtype) or f(images)
    from scope_streamdiffusion.pipeline import STEADY_CALLS

    for h in (40, 48, 48, 56, 40, 40):
        pipe(video=[uint8_frame(h, 80, seed=h)])
    assert seen[0] == torch.uint8  # the size the stream starts with: raw at once
    assert torch.uint8 not in seen[1:]  # then it changed: the general path until steady again
    for _ in range(STEADY_CALLS - 2):  # 40 px, STEADY_CALLS times in a row: steady
        pipe(video=[uint8_frame(40, 80, seed=1)])
    assert seen[-1] == torch.uint8
    pipe(video=[uint8_frame(48, 80, seed=2)], init_cache=True)  # a new stream starts with its own size
    assert seen[-1] == torch.uint8


def test_raw_batch_takes_uint8_rgb_frames_of_one_size():
    from scope_streamdiffusion.engine.frames import frames_to_batch, raw_batch, to_unit

    cpu = torch.device("cpu")
    a, b = uint8_frame(64, 32, seed=1), uint8_frame(64, 32, seed=2)
    for video in ([a], [a, b], torch.cat([a, b]), [a[0], b[0]]):
        raw = raw_batch(video)
        assert raw.dtype == torch.uint8 and raw.shape[1:] == (64, 32, 3)
        for width, height in ((32, 64), (48, 48), (16, 24)):  # as is, cropped and resized, downscaled
            assert torch.equal(to_unit(raw, width, height, torch.float16),
                               frames_to_batch(video, width, height, cpu, torch.float16))
    assert raw_batch([a.float() / 255]) is None  # floats are sanitised by the general path
    assert raw_batch([a, uint8_frame(48, 32)]) is None  # sizes differ within a call
    assert raw_batch([a.permute(0, 3, 1, 2)]) is None  # channels first
    assert raw_batch([torch.zeros(1, 8, 8, 4, dtype=torch.uint8)]) is None  # RGBA
    assert raw_batch([]) is None and raw_batch(torch.zeros(0, 8, 8, 3, dtype=torch.uint8)) is None
    assert raw_batch(torch.zeros(2, 0, 8, 3, dtype=torch.uint8)) is None


def test_empty_frames_sent_again_and_again_stay_one_clear_error(pipe):
    empty = torch.zeros(2, 0, 8, 3, dtype=torch.uint8)
    for _ in range(4):
        with pytest.raises(ValueError, match="empty frame"):
            pipe(video=empty)
    assert pipe(video=[uint8_frame()])["video"].shape == (1, 64, 64, 3)


def test_text_to_image_without_video(pipe):
    out = pipe()["video"]
    assert out.shape == (1, 64, 64, 3)
    assert torch.equal(out, pipe()["video"])  # same seed, same prompt: same frame


def test_values_persist_until_changed(tiny_sd15):
    pipe = StreamDiffusionPipeline(model_id=str(tiny_sd15), guidance_scale=2.0, cfg_type="full", **SIZE)
    pipe(video=[uint8_frame()])
    assert pipe.engine.settings.guidance_scale == 2.0 and pipe.engine.settings.cfg_type is CfgType.FULL
    pipe(video=[uint8_frame()], strength=0.3)
    pipe(video=[uint8_frame()])
    assert pipe.engine.settings.strength == 0.3 and pipe.engine.settings.guidance_scale == 2.0
    # Scope resends the whole dict each call: resending the same values changes nothing.
    pipe(video=[uint8_frame()], strength=0.3, guidance_scale=2.0)
    assert pipe.engine.settings.strength == 0.3


def test_unknown_keys_never_break_a_call(tiny_sd15):
    from pydantic_core import PydanticUndefined

    pipe = StreamDiffusionPipeline(model_id=str(tiny_sd15), manage_cache=True, base_seed=42, input_size=1,
                                   vace_context_scale=1.0, tags=PydanticUndefined, **SIZE)
    out = pipe(video=[uint8_frame()], input_mode="video", graph={"nodes": []}, pipeline_ids=["streamdiffusion"],
               denoising_step_list=[700, 500], noise_scale=0.7, noise_controller=True, init_cache=True,
               video_timestamps=[object()], something_else=object())
    assert out["video"].shape == (1, 64, 64, 3)


def test_out_of_range_and_wrong_types_warn_once(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="scope_streamdiffusion"):
        for value in (7, 7.5, 9):
            pipe(video=[uint8_frame()], strength=value)
        pipe(video=[uint8_frame()], guidance_scale="2.5")
        pipe(video=[uint8_frame()], num_inference_steps="many")
    assert pipe.engine.settings.strength == 1.2
    assert pipe.engine.settings.guidance_scale == 2.5  # "2.5" coerced
    assert pipe.engine.settings.num_inference_steps == 1  # unusable: previous value kept
    assert sum("strength" in r.getMessage() for r in caplog.records) == 1
    assert sum("num_inference_steps" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("prompts,expected", [
    ("a dog", (("a dog", 1.0),)),
    (["a dog", "a cat"], (("a dog", 1.0), ("a cat", 1.0))),
    ([{"text": "a dog", "weight": 100.0}, {"text": "a cat", "weight": 50}], (("a dog", 100.0), ("a cat", 50.0))),
])
def test_prompt_forms(pipe, prompts, expected):
    pipe(video=[uint8_frame()], prompts=prompts)
    assert pipe.engine.settings.prompts == expected


def test_transition_blends_over_num_steps(pipe):
    pipe(video=[uint8_frame()], prompts=[{"text": "a dog", "weight": 1.0}])
    pipe(video=[uint8_frame()], transition={"target_prompts": [{"text": "a castle", "weight": 100}],
                                            "num_steps": 3, "temporal_interpolation_method": "linear"})
    first = dict(pipe.engine.settings.prompts)
    assert first["a dog"] == pytest.approx(2 / 3) and first["a castle"] == pytest.approx(1 / 3)
    pipe(video=[uint8_frame()])
    pipe(video=[uint8_frame()])
    assert pipe.engine.settings.prompts == (("a castle", 100.0),)


def test_init_cache_restarts_the_stream(tiny_sd15):
    kw = dict(model_id=str(tiny_sd15), num_inference_steps=3, **SIZE)
    a, b = StreamDiffusionPipeline(**kw), StreamDiffusionPipeline(**kw)
    for s in range(4):
        a(video=[uint8_frame(seed=s)])
    restarted = a(video=[uint8_frame(seed=9)], init_cache=True)["video"]
    fresh = b(video=[uint8_frame(seed=9)], init_cache=True)["video"]
    assert (restarted - fresh).abs().max() < 1e-5


def test_strength_zero_passes_the_frame_through(pipe):
    frame = uint8_frame(h=64, w=64)
    out = pipe(video=[frame], strength=0.0)["video"]
    assert torch.allclose(out, frame[0].float() / 255, atol=1e-6)


def test_prepare_asks_for_frame_buffer_size_frames(tiny_sd15):
    pipe = StreamDiffusionPipeline(model_id=str(tiny_sd15), frame_buffer_size=2, **SIZE)
    assert pipe.prepare(video=True) == Requirements(input_size=2)
    assert pipe.prepare() is None
    out = pipe(video=[uint8_frame(seed=i) for i in range(3)])["video"]
    assert out.shape == (3, 64, 64, 3)


def test_width_height_snap_to_multiple_of_8(tiny_sd15):
    pipe = StreamDiffusionPipeline(model_id=str(tiny_sd15), width=70, height=99, use_tiny_vae=False)
    assert (pipe.width, pipe.height) == (64, 96)
    assert pipe(video=[uint8_frame()])["video"].shape == (1, 96, 64, 3)


def test_tiny_vae_and_lcm_lora_via_pipeline(tiny_sd15, tiny_taesd, tiny_lcm_lora):
    pipe = StreamDiffusionPipeline(model_id=str(tiny_sd15), width=64, height=64, use_tiny_vae=True,
                                   tiny_vae_id=str(tiny_taesd), use_lcm_lora=True, lcm_lora_id=str(tiny_lcm_lora))
    assert pipe.engine.models.is_tiny_vae
    assert pipe(video=[uint8_frame()])["video"].shape == (1, 64, 64, 3)


def test_load_errors_name_cause_and_fix(tmp_path, tiny_sd15):
    with pytest.raises(ModelLoadError, match="does not exist.*Fix"):
        StreamDiffusionPipeline(model_id=str(tmp_path / "nope"), **SIZE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a diffusers folder.*Fix"):
        StreamDiffusionPipeline(model_id=str(tmp_path / "empty"), **SIZE)
    with pytest.raises(ModelLoadError, match="(?s)unreachable.*Fix.*download"):
        StreamDiffusionPipeline(model_id="someone/not-cached-model", **SIZE)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd15, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match="Fix"):
        StreamDiffusionPipeline(model_id=str(broken), **SIZE)


def test_torch_objects_and_paths_as_load_values(tiny_sd15, caplog):
    """A library caller's torch.device, torch.dtype and pathlib.Path mean what they say (they were
    ignored with a warning: a device object then gave the automatic device); a model that is not a
    string is an error, not the default model (a download of several GB)."""
    import logging
    from pathlib import Path

    with caplog.at_level(logging.WARNING, logger="scope_streamdiffusion"):
        pipe = StreamDiffusionPipeline(model_id=Path(tiny_sd15), device=torch.device("cpu"), dtype=torch.bfloat16,
                                       **SIZE)
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.bfloat16
    assert not [r for r in caplog.records if "Ignoring" in r.getMessage()]
    with pytest.raises(ValueError, match="model_id=123 is not a model.*Fix"):
        StreamDiffusionPipeline(model_id=123, **SIZE)


def test_cuda_requested_without_cuda(tiny_sd15):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        StreamDiffusionPipeline(model_id=str(tiny_sd15), device="cuda", **SIZE)


def test_slerp_transition_restores_the_users_interpolation_method(pipe):
    pipe(video=[uint8_frame()], prompts="a dog", prompt_interpolation_method="linear")
    pipe(video=[uint8_frame()], transition={"target_prompts": [{"text": "a castle", "weight": 1.0}],
                                            "num_steps": 2, "temporal_interpolation_method": "slerp"})
    assert pipe.engine.settings.prompt_interpolation_method == "slerp"  # mid-transition
    pipe(video=[uint8_frame()])
    assert pipe.engine.settings.prompts == (("a castle", 1.0),)
    assert pipe.engine.settings.prompt_interpolation_method == "linear"


def test_short_groups_never_drop_or_misattribute_frames(tiny_sd15):
    frames = [uint8_frame(seed=i) for i in range(5)]
    one_step = StreamDiffusionPipeline(model_id=str(tiny_sd15), frame_buffer_size=2, **SIZE)
    assert one_step(video=frames)["video"].shape[0] == 5  # no lag: one output per input frame
    reference = StreamDiffusionPipeline(model_id=str(tiny_sd15), frame_buffer_size=1, num_inference_steps=2, **SIZE)
    expected = [reference(video=[f])["video"] for f in frames + [frames[-1]]]
    lagged = StreamDiffusionPipeline(model_id=str(tiny_sd15), frame_buffer_size=2, num_inference_steps=2, **SIZE)
    out = lagged(video=frames)["video"]  # groups (0,1) (2,3) (4,4*): with one step of lag
    assert out.shape[0] == 6
    # Output group g shows input group g-1 (group 0 at first): frames 0,1 0,1 2,3, never padding in place of
    # a frame. With frame_buffer_size 1 frame k's result is the output of call k+1 (call 0 for frame 0).
    result = {0: expected[0], 1: expected[2], 2: expected[3], 3: expected[4]}
    for got, want in zip(out, [result[0], result[1], result[0], result[1], result[2], result[3]]):
        assert (got - want[0]).abs().max() < 1e-3


def test_a_short_group_without_lag_returns_only_its_own_frames(tiny_sd15):
    """Lag is what the engine did, not what the settings say: a priming call or the strength-0
    passthrough returns the group's own frames, so the padding's outputs are dropped."""
    frames = [uint8_frame(seed=i) for i in range(4)]
    passthrough = StreamDiffusionPipeline(model_id=str(tiny_sd15), frame_buffer_size=3, num_inference_steps=2,
                                          strength=0.0, **SIZE)
    assert passthrough(video=frames)["video"].shape[0] == 4
    priming = StreamDiffusionPipeline(model_id=str(tiny_sd15), frame_buffer_size=3, num_inference_steps=2, **SIZE)
    assert priming(video=frames[:1])["video"].shape[0] == 1  # the first call primes: no lag yet
    assert priming(video=frames[:1])["video"].shape[0] == 3  # primed: the outputs of the earlier group


def test_a_list_edited_in_place_and_resent_is_a_change(pipe):
    prompts = [{"text": "a dog", "weight": 1.0}]
    pipe(video=[uint8_frame()], prompts=prompts)
    prompts[0]["text"] = "a boat"  # library callers may reuse their list
    pipe(video=[uint8_frame()], prompts=prompts)
    assert pipe.engine.settings.prompts == (("a boat", 1.0),)
