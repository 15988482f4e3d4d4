"""What Scope relies on, without Scope: construction, prepare, init_cache, transitions, model lookup."""

import pytest
import torch

from scope_streamdiffusion import StreamDiffusionPipeline
from scope_streamdiffusion.pipeline import PromptTransition
from scope_streamdiffusion._scope import Requirements
from scope_streamdiffusion.engine import ModelLoadError
from scope_streamdiffusion.engine.models import resolve_source, scope_models_dir
from scope_streamdiffusion.schema import StreamDiffusionConfig

SIZE = dict(width=64, height=64, use_tiny_vae=False)


def frame(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(1, 64, 64, 3, generator=gen) * 255).to(torch.uint8)


def scope_construction_kwargs(**load_params):
    """Scope's rule for plugins: every field default that is not None, overlaid with the load params."""
    defaults = {name: f.default for name, f in StreamDiffusionConfig.model_fields.items() if f.default is not None}
    return {**defaults, **load_params}


@pytest.fixture(scope="module")
def pipe(tiny_sd15):
    kwargs = scope_construction_kwargs(model_id=str(tiny_sd15), height=64, width=64, use_tiny_vae=False,
                                       lora_merge_mode="permanent_merge")
    return StreamDiffusionPipeline(**kwargs)


def test_built_the_way_scope_builds_plugins(pipe):
    assert (pipe.width, pipe.height) == (64, 64)
    assert pipe.loaded_lora_adapters == []
    # Scope reads pipeline.state.get(...) if a `state` attribute exists (transition bookkeeping).
    assert not hasattr(pipe, "state")


def test_prepare_video_mode_and_text_mode(pipe):
    assert pipe.prepare(video=True) == Requirements(input_size=1)  # graph build: no other kwargs
    assert pipe.prepare(input_mode="video", prompts=[{"text": "a", "weight": 100.0}], video=True) \
        == Requirements(input_size=1)
    assert pipe.prepare(input_mode="text", prompts=[{"text": "a", "weight": 100.0}]) is None
    assert pipe.prepare() is None


def test_text_mode_output_on_device_in_range(pipe):
    out = pipe(input_mode="text", init_cache=True, prompts=[{"text": "a red fox", "weight": 100.0}])["video"]
    assert out.shape == (1, 64, 64, 3) and out.dtype == torch.float32 and out.device == pipe.device
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_init_cache_resets_filter_history(tiny_sd15):
    pipe = StreamDiffusionPipeline(model_id=str(tiny_sd15), similar_image_filter=True,
                                   similar_image_filter_threshold=0.9, **SIZE)
    pipe(video=[frame()], init_cache=True)
    for _ in range(3):
        pipe(video=[frame()], init_cache=False)
    skipped = pipe.engine.frames_skipped
    assert skipped >= 1  # identical frames: skipped
    pipe(video=[frame()], init_cache=True)
    assert pipe.engine.frames_skipped == skipped  # history gone: processed again


def test_transition_delivered_once_like_scope(pipe):
    """Scope passes `transition` on one call only; the pipeline finishes the blend by itself."""
    pipe(video=[frame()], prompts=[{"text": "a dog", "weight": 100.0}])
    transition = {"target_prompts": [{"text": "a castle", "weight": 100}], "num_steps": 4,
                  "temporal_interpolation_method": "linear"}
    pipe(video=[frame()], prompts=[{"text": "a dog", "weight": 100.0}], transition=transition)
    weights = []
    for _ in range(4):
        weights.append(dict(pipe.engine.settings.prompts).get("a castle", 0.0)
                       / sum(w for _, w in pipe.engine.settings.prompts))
        pipe(video=[frame()], prompts=[{"text": "a dog", "weight": 100.0}])
    assert weights[:3] == pytest.approx([0.25, 0.5, 0.75])
    assert pipe.engine.settings.prompts == (("a castle", 100.0),)
    # A new prompt, then the very same transition again: it runs again.
    pipe(video=[frame()], prompts=[{"text": "a tree", "weight": 100.0}])
    pipe(video=[frame()], prompts=[{"text": "a tree", "weight": 100.0}], transition=transition)
    assert set(dict(pipe.engine.settings.prompts)) == {"a tree", "a castle"}


def test_transition_with_missing_fields_like_raw_data_channel_updates(pipe):
    pipe(video=[frame()], prompts="a bird")
    pipe(video=[frame()], transition={"target_prompts": [{"text": "a boat", "weight": 1}]})  # no num_steps/method
    assert pipe.engine.settings.prompts == (("a boat", 1.0),)


def test_a_transition_moves_with_calls_not_with_updates(pipe):
    """Each call is one step of a transition; update() (parameters without a frame, e.g. from
    Scope's data channel between frames) does not move it."""
    pipe(video=[frame()], prompts=[{"text": "a dog", "weight": 1.0}])
    pipe.update(transition={"target_prompts": [{"text": "a castle", "weight": 1}], "num_steps": 4})
    for _ in range(5):
        pipe.update(guidance_scale=1.5)
    assert pipe.engine.settings.prompts == (("a dog", 1.0),)  # not started: no call yet
    pipe(video=[frame()])
    assert dict(pipe.engine.settings.prompts) == pytest.approx({"a dog": 0.75, "a castle": 0.25})
    pipe.update(guidance_scale=1.2)
    pipe(video=[frame()])
    assert dict(pipe.engine.settings.prompts) == pytest.approx({"a dog": 0.5, "a castle": 0.5})


def test_a_transition_started_mid_transition_blends_from_what_is_on_screen(pipe):
    """Two presets clicked within num_steps calls: the second blend starts from the first one's
    current mix, not from its target (the cat would vanish in one frame)."""
    pipe(video=[frame()], prompts=[{"text": "a cat", "weight": 1.0}])
    pipe(video=[frame()], transition={"target_prompts": [{"text": "a dog", "weight": 1}], "num_steps": 10})
    pipe(video=[frame()])
    pipe(video=[frame()])
    assert dict(pipe.engine.settings.prompts) == pytest.approx({"a cat": 0.7, "a dog": 0.3})
    pipe(video=[frame()], transition={"target_prompts": [{"text": "a fox", "weight": 1}], "num_steps": 10})
    assert dict(pipe.engine.settings.prompts) == pytest.approx({"a cat": 0.63, "a dog": 0.27, "a fox": 0.1})
    # Back to a text already in the mix: it is listed once, its shares summed.
    pipe(video=[frame()], transition={"target_prompts": [{"text": "a cat", "weight": 1}], "num_steps": 2})
    prompts = pipe.engine.settings.prompts
    assert len(prompts) == 3 and dict(prompts)["a cat"] == pytest.approx(0.63 / 2 + 0.5)
    pipe(video=[frame()])
    assert pipe.engine.settings.prompts == (("a cat", 1.0),)


def test_a_chain_of_overlapping_transitions_blends_a_bounded_mix(pipe):
    """A new text every 2 calls, each as a 10-step transition (a timeline or OSC feed): none ever ends.
    The mix on screen keeps its larger shares only, so each call blends (and the prompt cache holds)
    a few texts, not every text ever sent."""
    pipe(video=[frame()], prompts=[{"text": "text 0", "weight": 1.0}])
    encoder = pipe.engine.prompt_encoder
    sizes, encoded = [], []
    for i in range(1, 121):
        pipe(video=[frame()], transition={"target_prompts": [{"text": f"text {i}", "weight": 1}], "num_steps": 10})
        before = encoder.encode_count
        pipe(video=[frame()])
        encoded.append(encoder.encode_count - before)
        sizes.append(len(pipe.engine.settings.prompts))
    assert max(sizes) <= PromptTransition.SOURCE_TEXTS + 1
    assert max(encoded[-60:]) == 0  # a call within a transition encodes nothing new
    assert sum(dict(pipe.engine.settings.prompts).values()) == pytest.approx(1.0)


@pytest.mark.parametrize("update", [False, True])
def test_a_transition_sent_with_its_target_as_prompts_still_blends(pipe, update):
    """Scope: a transition takes precedence over `prompts` for starting the blend. Clients that send
    both (the target in `prompts` too) get the blend, not a cut."""
    pipe(video=[frame()], prompts=[{"text": f"a cat {update}", "weight": 100.0}])
    target = [{"text": f"a dog {update}", "weight": 100.0}]
    send = pipe.update if update else (lambda **kw: pipe(video=[frame()], **kw))
    send(prompts=target, transition={"target_prompts": target, "num_steps": 4})
    if update:  # an update() does not move the blend: the cat is still on screen until a call
        assert pipe.engine.settings.prompts == ((f"a cat {update}", 100.0),)
        pipe(video=[frame()], prompts=target)
    assert dict(pipe.engine.settings.prompts) == pytest.approx({f"a cat {update}": 0.75, f"a dog {update}": 0.25})
    for _ in range(3):
        pipe(video=[frame()], prompts=target)  # resent as Scope resends: not a change
    assert pipe.engine.settings.prompts == ((f"a dog {update}", 100.0),)


def test_the_first_usable_of_prompts_and_prompt(tiny_sd15):
    """prompts=None or [] next to a prompt is no prompt: the prompt is used, at load as in a call;
    prompts wins when both are usable."""
    pipe = StreamDiffusionPipeline(model_id=str(tiny_sd15), prompts=None, prompt="a cat", **SIZE)
    assert pipe.engine.settings.prompts == (("a cat", 1.0),)
    pipe(video=[frame()], prompts=[], prompt="a bird")
    assert pipe.engine.settings.prompts == (("a bird", 1.0),)
    both = StreamDiffusionPipeline(model_id=str(tiny_sd15), prompts=[{"text": "a dog", "weight": 2.0}],
                                   prompt="a cat", **SIZE)
    assert both.engine.settings.prompts == (("a dog", 2.0),)
    both(video=[frame()], prompts=[{"text": "a fox", "weight": 1.0}], prompt="a bird")
    assert both.engine.settings.prompts == (("a fox", 1.0),)


@pytest.mark.parametrize("steps", ["abc", float("nan"), float("inf"), [3], None, -5, "4"])
def test_a_transition_with_unusable_steps_goes_to_its_target(pipe, steps):
    source = f"a dog {steps!r}"  # a new prompt each time: Scope's resent prompts are not a change
    pipe(video=[frame()], prompts=[{"text": source, "weight": 1.0}])
    out = pipe(video=[frame()], transition={"target_prompts": [{"text": "a boat", "weight": 1}], "num_steps": steps})
    assert out["video"].shape == (1, 64, 64, 3) and torch.isfinite(out["video"]).all()
    if steps == "4":  # a number sent as text is still a number
        assert dict(pipe.engine.settings.prompts) == pytest.approx({source: 0.75, "a boat": 0.25})
    else:
        assert pipe.engine.settings.prompts == (("a boat", 1.0),)


def test_a_new_base_seed_is_a_new_seed_like_scopes_beat_reset(tiny_sd15):
    """Scope's beat-synced cache reset sends init_cache=True with a new random base_seed: new noise."""
    pipe = StreamDiffusionPipeline(**scope_construction_kwargs(model_id=str(tiny_sd15), **SIZE))
    first = pipe(video=[frame()], init_cache=True, base_seed=42)["video"]
    again = pipe(video=[frame()], init_cache=True, base_seed=42)["video"]
    reseeded = pipe(video=[frame()], init_cache=True, base_seed=1234)["video"]
    assert torch.equal(first, again) and (reseeded - first).abs().max() > 1e-3
    assert pipe.params["seed"] == 1234
    pipe(video=[frame()], seed=7, base_seed=1234)  # base_seed resent unchanged: the seed control wins
    assert pipe.params["seed"] == 7
    pipe(video=[frame()], seed=42, base_seed=1234)
    assert torch.equal(pipe(video=[frame()], init_cache=True, base_seed=1234)["video"], first)


def test_models_found_in_scopes_models_dir(tiny_sd15, tiny_taesd, tmp_path, monkeypatch):
    """Files fetched by Scope's download dialog land in <models dir>/<repo name>: loaded from there, offline."""
    monkeypatch.setenv("DAYDREAM_SCOPE_MODELS_DIR", str(tmp_path))
    assert scope_models_dir() == tmp_path.resolve()
    artifacts = {a.repo_id.split("/")[-1]: a for a in StreamDiffusionConfig.artifacts}
    (tmp_path / "sd-turbo").symlink_to(tiny_sd15, target_is_directory=True)
    (tmp_path / "taesd").symlink_to(tiny_taesd, target_is_directory=True)
    assert set(artifacts) == {"sd-turbo", "taesd"}
    assert resolve_source("stabilityai/sd-turbo") == str(tmp_path / "sd-turbo")
    pipe = StreamDiffusionPipeline(model_id="stabilityai/sd-turbo", width=64, height=64, use_tiny_vae=True)
    assert pipe.engine.models.extras["source"] == str(tmp_path / "sd-turbo")
    assert pipe.engine.models.is_tiny_vae and pipe.engine.models.family.distilled
    assert pipe(video=[frame()])["video"].shape == (1, 64, 64, 3)


def test_offline_with_nothing_cached_names_the_model_and_the_fix(tmp_path, monkeypatch):
    from huggingface_hub import try_to_load_from_cache

    monkeypatch.setenv("DAYDREAM_SCOPE_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if isinstance(try_to_load_from_cache("stabilityai/sd-turbo", "model_index.json"), str):
        pytest.skip("sd-turbo is in this machine's Hugging Face cache")
    with pytest.raises(ModelLoadError) as info:
        StreamDiffusionPipeline(model_id="stabilityai/sd-turbo", **SIZE)
    message = str(info.value)
    assert "stabilityai/sd-turbo" in message and "Fix" in message
    assert "scope-streamdiffusion download stabilityai/sd-turbo" in message and "Scope" in message
