"""The engine's defining properties, on tiny real diffusers models (fp32, CPU)."""

import pytest
import torch
from conftest import make_frames

from scope_streamdiffusion.engine import CfgType, StreamDiffusion, StreamSettings
from scope_streamdiffusion.engine.schedule import timesteps_from_strength, timesteps_from_t_index_list

TOL = 1e-3
CFG_TYPES = [CfgType.NONE, CfgType.FULL, CfgType.SELF, CfgType.INITIALIZE]


def engine_for(models, **settings):
    base = dict(prompts=(("a red fox in the snow", 1.0),), negative_prompt="blurry", num_inference_steps=3,
                strength=0.8, guidance_scale=1.8, delta=0.7, seed=7)
    base.update(settings)
    return StreamDiffusion(models, width=64, height=64, settings=StreamSettings(**base))


def sequential_reference(models, frames, **settings):
    engine = engine_for(models, use_denoising_batch=False, **settings)
    return [engine(f) for f in frames]


class UnetRows:
    """Counts the latent rows of every UNet call with a forward pre-hook on the real module."""

    def __init__(self, unet):
        self.rows = []
        self.handle = unet.register_forward_pre_hook(lambda _m, args: self.rows.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("cfg_type", CFG_TYPES)
@pytest.mark.parametrize("add_noise", [True, False])
def test_stream_batch_equals_sequential_per_frame(sd15_models, cfg_type, add_noise):
    frames = make_frames(6)
    n = 3
    expected = sequential_reference(sd15_models, frames, cfg_type=cfg_type, do_add_noise=add_noise)
    engine = engine_for(sd15_models, cfg_type=cfg_type, do_add_noise=add_noise)
    outputs = [engine(f) for f in frames]
    for j, out in enumerate(outputs):
        source = max(0, j - (n - 1))  # call j shows frame j-(n-1); the first n-1 calls show frame 0
        assert (out - expected[source]).abs().max() <= TOL, (cfg_type, j)
    # Results of different frames differ by more than the tolerance: the comparison can tell them apart.
    assert all((expected[i] - expected[i + 1]).abs().max() > TOL for i in range(len(frames) - 1))


def test_v_prediction_batch_equals_sequential(tiny_sd15_v):
    from scope_streamdiffusion.engine import load_models

    models = load_models(str(tiny_sd15_v), device=torch.device("cpu"), dtype=torch.float32, use_tiny_vae=False)
    assert models.prediction_type == "v_prediction"
    frames = make_frames(4)
    expected = sequential_reference(models, frames, cfg_type=CfgType.SELF, num_inference_steps=2)
    engine = engine_for(models, cfg_type=CfgType.SELF, num_inference_steps=2)
    outs = [engine(f) for f in frames]
    for j in range(1, 4):
        assert (outs[j] - expected[j - 1]).abs().max() <= TOL


def test_no_warmup_frames(sd15_models):
    frames = make_frames(3)
    engine = engine_for(sd15_models, num_inference_steps=4)
    first = engine(frames[0])
    # Not blank, not brown: a real decoded image with structure.
    assert first.std() > 0.01 and torch.isfinite(first).all()
    ref = sequential_reference(sd15_models, frames[:1], num_inference_steps=4)[0]
    for f in frames[1:]:
        assert (engine(f) - ref).abs().max() <= TOL


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_frame_buffer_size_matches_single_frames(sd15_models, steps):
    frames = make_frames(6)
    single = engine_for(sd15_models, num_inference_steps=steps, cfg_type=CfgType.INITIALIZE)
    singles = [single(f) for f in frames]
    grouped = StreamDiffusion(sd15_models, width=64, height=64, frame_buffer_size=2, settings=single.settings)
    outs = []
    for i in range(0, 6, 2):
        outs.extend(grouped(torch.cat(frames[i:i + 2])).split(1))
    seq = sequential_reference(sd15_models, frames, num_inference_steps=steps, cfg_type=CfgType.INITIALIZE)
    # Group g (frames 2g, 2g+1) comes out after steps-1 more calls, as a pair.
    for g in range(3):
        src = max(0, g - (steps - 1))
        for k in range(2):
            expect = seq[2 * src + k] if g >= steps - 1 else seq[k]
            assert (outs[2 * g + k] - expect).abs().max() <= TOL, (steps, g, k)
    assert len(singles) == 6


def test_same_seed_same_frames_different_seed_differs(sd15_models):
    frames = make_frames(3)
    a = [engine_for(sd15_models, seed=1)(f) for f in frames]
    b = [engine_for(sd15_models, seed=1)(f) for f in frames]
    c = [engine_for(sd15_models, seed=2)(f) for f in frames]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all((x - z).abs().max() > 1e-2 for x, z in zip(a, c))


def test_txt2img_is_seeded(sd15_models):
    a = engine_for(sd15_models, seed=3)(None)
    b = engine_for(sd15_models, seed=3)(None)
    c = engine_for(sd15_models, seed=4)(None)
    assert a.shape == (1, 3, 64, 64)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2


def test_strength_zero_returns_input_without_the_model(sd15_models):
    frame = make_frames(1)[0]
    engine = engine_for(sd15_models, strength=0.0)
    with UnetRows(sd15_models.unet) as rows:
        out = engine(frame)
    assert rows.rows == []
    assert torch.equal(out, frame)


def test_strength_mapping_is_monotonic_without_dead_zone():
    previous = None
    for s in [i / 100 for i in range(1, 101)]:
        ts = timesteps_from_strength(s, 2)
        assert ts == sorted(ts, reverse=True)
        if previous is not None:
            assert ts[0] >= previous
        previous = ts[0]
    assert timesteps_from_strength(1.0, 4) == [999, 749, 499, 249]
    assert timesteps_from_strength(0.5, 1) == [499]
    assert timesteps_from_t_index_list([32, 45]) == [359, 99]


def test_strength_changes_output_everywhere(sd15_models):
    frame = make_frames(1)[0]
    outs = [engine_for(sd15_models, strength=s, num_inference_steps=1, guidance_scale=1.0)(frame)
            for s in (0.3, 0.32, 1.0, 1.1, 1.2)]
    for x, y in zip(outs, outs[1:]):
        assert (x - y).abs().max() > 1e-4
    # At 1.2 the input is faded out completely: the output no longer depends on it.
    other = make_frames(2)[1]
    assert (engine_for(sd15_models, strength=1.2, num_inference_steps=1, guidance_scale=1.0)(other) - outs[-1]).abs().max() < 1e-5
    assert (engine_for(sd15_models, strength=1.0, num_inference_steps=1, guidance_scale=1.0)(other) - outs[2]).abs().max() > 1e-4


@pytest.mark.parametrize("cfg_type,guidance,expected_rows", [
    (CfgType.NONE, 2.0, [3]), (CfgType.SELF, 2.0, [3]), (CfgType.INITIALIZE, 2.0, [4]),
    (CfgType.FULL, 2.0, [6]), (CfgType.FULL, 1.0, [3]), (CfgType.INITIALIZE, 0.5, [3]),
])
def test_unet_rows_per_cfg_type(sd15_models, cfg_type, guidance, expected_rows):
    frames = make_frames(2)
    engine = engine_for(sd15_models, cfg_type=cfg_type, guidance_scale=guidance)
    engine(frames[0])  # priming call runs the steps one by one
    with UnetRows(sd15_models.unet) as rows:
        engine(frames[1])
    assert rows.rows == expected_rows


def test_t_index_list_overrides_steps(sd15_models):
    engine = engine_for(sd15_models, t_index_list=(32, 45), num_inference_steps=4)
    engine(make_frames(1)[0])
    assert engine._prepared.sched.timesteps.tolist() == [359, 99]


@pytest.mark.parametrize("cfg_type", [CfgType.FULL, CfgType.INITIALIZE, CfgType.SELF])
def test_runtime_prompt_change_reaches_every_cfg_row(sd15_models, cfg_type):
    """After a prompt/negative change, a running stream equals a fresh stream with the new prompts."""
    frames = make_frames(8)
    n = 2
    engine = engine_for(sd15_models, cfg_type=cfg_type, num_inference_steps=n)
    for f in frames[:3]:
        engine(f)
    engine.update(prompts=(("a castle at night", 1.0),), negative_prompt="low quality")
    outs = [engine(f) for f in frames[3:]]
    expected = sequential_reference(sd15_models, frames, cfg_type=cfg_type, num_inference_steps=n,
                                    prompts=(("a castle at night", 1.0),), negative_prompt="low quality")
    # Frames that entered after the change and saw only the new prompts: outputs 1.. (frame 3+j-1)
    for j in range(n, len(outs)):
        assert (outs[j] - expected[3 + j - (n - 1)]).abs().max() <= TOL


def test_runtime_changes_never_reload_and_cache_prompts(sd15_models):
    engine = engine_for(sd15_models)
    unet, vae = sd15_models.unet, sd15_models.vae
    frame = make_frames(1)[0]
    a = engine(frame)
    count = engine.prompt_encoder.encode_count
    engine(frame)
    assert engine.prompt_encoder.encode_count == count  # unchanged text: no re-encode
    engine.update(prompts=(("a lighthouse", 1.0),), guidance_scale=3.0, delta=0.3, num_inference_steps=2,
                  cfg_type=CfgType.FULL, strength=0.6)
    b = engine(frame)
    assert engine.prompt_encoder.encode_count == count + 1
    assert engine.models.unet is unet and engine.models.vae is vae
    assert (a - b).abs().max() > 1e-3
    engine.update(prompts=(("a red fox in the snow", 1.0),))
    engine(frame)
    assert engine.prompt_encoder.encode_count == count + 1  # cached


def test_modulated_parameters_rebuild_only_what_depends_on_them(sd15_models):
    """Per-frame modulation (guidance, delta, strength) reuses the prompt embeddings and, when the
    timesteps are the same, the schedule; the frames equal a fresh engine's under the same settings."""
    settings = dict(num_inference_steps=2, cfg_type=CfgType.SELF, guidance_scale=1.4, use_denoising_batch=False)
    engine = engine_for(sd15_models, **settings)
    frame = make_frames(1)[0]
    engine(frame)
    first = engine._prepared
    engine.update(guidance_scale=1.8, delta=0.6)
    engine(frame)
    after_guidance = engine._prepared
    assert after_guidance.prompt is first.prompt and after_guidance.negative is first.negative
    assert after_guidance.sched is first.sched
    engine.update(strength=0.7)
    engine(frame)
    after_strength = engine._prepared
    assert after_strength.prompt is first.prompt and after_strength.sched is not first.sched
    engine.update(strength=0.8)  # back: the cached schedule
    engine(frame)
    assert engine._prepared.sched is first.sched
    engine.update(strength=0.7)
    got = engine(frame)
    fresh = engine_for(sd15_models, **{**settings, "guidance_scale": 1.8, "delta": 0.6, "strength": 0.7})
    assert (fresh(frame) - got).abs().max() <= 1e-6
    engine.update(negative_prompt="low quality")
    engine(frame)
    assert engine._prepared.negative is not first.negative


def test_compel_weighting_and_long_prompts(sd15_models):
    engine = engine_for(sd15_models)
    enc = engine.prompt_encoder
    plain = enc.encode("a cat on a sofa").embeds
    weighted = enc.encode("a (cat)1.5 on a sofa").embeds
    plus = enc.encode("a cat++ on a sofa").embeds
    assert plain.shape == weighted.shape == (1, 77, 32)
    assert (plain - weighted).abs().max() > 1e-4 and (plain - plus).abs().max() > 1e-4
    long_text = ", ".join(["a very detailed painting of a quiet harbour town at dawn"] * 12)
    long = enc.encode(long_text).embeds
    assert long.shape[1] >= 154  # encoded in 77-token chunks, not truncated
    # A long prompt with a short negative still runs full CFG (padded to the same length).
    engine.update(prompts=((long_text, 1.0),), cfg_type=CfgType.FULL)
    out = engine(make_frames(1)[0])
    assert torch.isfinite(out).all()


def test_prompts_compel_rejects_are_plain_text_with_one_warning(sd15_models, caplog):
    """compel raises on some syntax (a blend whose weights don't match its prompts, empty
    parentheses): that prompt is its text without the syntax, with one warning, so a typo in a live
    prompt never fails every frame of the stream."""
    import logging

    engine = engine_for(sd15_models, num_inference_steps=1)
    enc = engine.prompt_encoder
    bad = {'("a cat", "a dog").blend(0.7)': "a cat , a dog .blend 0.7", "()": "", "(())1.5": "1.5"}
    with caplog.at_level(logging.WARNING):
        for text, plain in bad.items():
            assert torch.equal(enc.encode(text).embeds, enc.encode(plain).embeds), text
        engine.update(prompts=(("()", 1.0),))
        outputs = [engine(f) for f in make_frames(3)]
    assert all(torch.isfinite(o).all() for o in outputs)
    assert sum("not valid compel syntax" in r.getMessage() for r in caplog.records) == len(bad)


def test_prompt_weights_too_large_or_infinite_still_blend(sd15_models):
    from scope_streamdiffusion.parameters import normalize_prompts

    engine = engine_for(sd15_models, num_inference_steps=1)
    enc = engine.prompt_encoder
    cat = enc.encode("a cat").embeds
    for weights in ([float("inf"), 1.0], [1e308, 1e308], [float("inf"), float("inf")]):
        prompts = normalize_prompts([{"text": "a cat", "weight": weights[0]}, {"text": "a dog", "weight": weights[1]}])
        mixed = enc.blend(list(prompts)).embeds
        assert torch.isfinite(mixed).all() and mixed.abs().max() > 0.1, weights
        if weights[1] == 1.0:
            assert (mixed - cat).abs().max() < 1e-4  # the infinite weight dominates
        engine.update(prompts=prompts)
        assert torch.isfinite(engine(make_frames(1)[0])).all()


PLAIN_TEXTS = ["a cat on a sofa", "portrait of a woman, oil painting, highly detailed, dramatic lighting, 8k",
               "hyper-realistic it's a_b cat.and a dog, x.blend y, AND BREAK <lora:x:1> cat:1.2 café 日本",
               "a, b,"]
SYNTAX_TEXTS = ["a (cat)1.5 on a sofa", "a cat++ on a sofa", "a cat-- on a sofa", "a  cat", " a cat", "a,cat",
                "a cat,, a dog", 'a ("cat", "dog").blend(1, 1)', "a cat\non a sofa", ""]


def random_plain_texts(count: int, seed: int = 0) -> list[str]:
    """Texts in PLAIN_PROMPT's grammar, punctuation-heavy (where a parser would differ if it did)."""
    import random

    from scope_streamdiffusion.engine.prompts import PLAIN_PROMPT

    rng = random.Random(seed)
    alphabet = list("abcxyzAZ019" * 2) + list(",,,---.:;!?'#@~*&^$%/<>={}|_`") + ["é", "日本", "—"]
    texts = []
    while len(texts) < count:
        words = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 8))]
        text = " ".join(words)
        if PLAIN_PROMPT.fullmatch(text):
            texts.append(text)
    return texts


def test_plain_prompts_skip_compels_parser_for_the_same_result(monkeypatch):
    """compel's parser returns a plain prompt unchanged as one fragment of weight 1: the shortcut
    builds exactly that without the parser, and leaves everything with syntax (or odd spacing) to it."""
    from compel import Compel
    from compel.prompt_parser import PromptParser

    from scope_streamdiffusion.engine.prompts import PLAIN_PROMPT, compel_class

    fast = compel_class()
    for text in PLAIN_TEXTS + random_plain_texts(150):
        assert PLAIN_PROMPT.fullmatch(text)
        assert repr(fast.parse_prompt_string(text)) == repr(Compel.parse_prompt_string(text)), text
    for text in SYNTAX_TEXTS:
        assert not PLAIN_PROMPT.fullmatch(text), text
        assert repr(fast.parse_prompt_string(text)) == repr(Compel.parse_prompt_string(text)), text
    parsed = []
    original = PromptParser.parse_conjunction
    monkeypatch.setattr(PromptParser, "parse_conjunction", lambda self, text, **kw: parsed.append(text) or original(self, text, **kw))
    for text in PLAIN_TEXTS + SYNTAX_TEXTS:
        fast.parse_prompt_string(text)
    assert parsed == SYNTAX_TEXTS


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_prompt_embeddings_are_compels_own(request, family):
    """The same embeddings (and SDXL's pooled ones) as compel's own parse gives, bit for bit."""
    from compel import Compel

    engine = engine_for(request.getfixturevalue(f"{family}_models"))
    enc = engine.prompt_encoder
    texts = PLAIN_TEXTS + SYNTAX_TEXTS[:2]
    ours = [enc.encode(t) for t in texts]
    enc.clear()
    enc._compel.__class__ = Compel  # the same encoder object, compel's parser for every text
    for text, mine in zip(texts, ours):
        theirs = enc.encode(text)
        assert torch.equal(mine.embeds, theirs.embeds), text
        assert (mine.pooled is None) == (family == "sd15")
        assert mine.pooled is None or torch.equal(mine.pooled, theirs.pooled), text


def test_prompt_blend_and_cache_is_bounded(sd15_models):
    engine = engine_for(sd15_models)
    enc = engine.prompt_encoder
    a, b = enc.encode("a cat").embeds, enc.encode("a dog").embeds
    mid = enc.blend([("a cat", 1.0), ("a dog", 1.0)], "linear").embeds
    assert torch.allclose(mid, (a + b) / 2, atol=1e-5)
    mid_s = enc.blend([("a cat", 50.0), ("a dog", 50.0)], "slerp").embeds
    assert (mid_s - mid).abs().max() > 0 and torch.isfinite(mid_s).all()
    for i in range(enc.cache_size + 10):
        enc.encode(f"prompt number {i}")
    assert enc.cache_len == enc.cache_size


def test_schedules_for_every_strength_of_a_beat_stay_cached_and_the_cache_is_bounded(sd15_models):
    """A strength moved on every frame visits one timestep set per first timestep (up to 1000 per
    step count): all of them stay cached, so a long beat-synced stream stops building schedules."""
    engine = engine_for(sd15_models)
    first = {t: engine._schedule((t,)) for t in range(1000)}  # every 1-step set
    assert all(engine._schedule((t,)) is first[t] for t in range(1000))  # cached, none rebuilt
    for t in range(100):  # 2-step sets on top: the least recently used 1-step sets go
        engine._schedule((999 - t, 499 - t // 2))
    assert len(engine._schedules) == 1024
    assert (0,) not in engine._schedules and (999,) in engine._schedules


def test_similar_image_filter_skips_static_input(sd15_models):
    frame = make_frames(1)[0]
    engine = engine_for(sd15_models, similar_image_filter=True, similar_image_filter_threshold=0.9,
                        similar_image_filter_max_skip_frame=3, num_inference_steps=1)
    first = engine(frame)
    with UnetRows(sd15_models.unet) as rows:
        outs = [engine(frame) for _ in range(8)]
    assert engine.frames_skipped >= 6  # identical input: every allowed skip happens
    assert len(rows.rows) == 2  # max_skip_frame=3 forces a run after 3 skips
    assert all(torch.equal(o, first) for o in outs)
    # A very different frame is always processed.
    other = 1 - frame
    with UnetRows(sd15_models.unet) as rows:
        engine(other)
    assert rows.rows == [1]


def test_similar_image_filter_compares_frames_as_the_model_sees_them():
    """Cosine similarity in [-1, 1], as the model's input (and the reference's filter): in [0, 1]
    every frame points into the same corner, so a moving video's frames pass the default threshold."""
    from scope_streamdiffusion.engine.similar_image_filter import SimilarImageFilter
    from scope_streamdiffusion.video_io import test_pattern

    frames = [f.permute(2, 0, 1)[None].float() / 255 for f in test_pattern(60, 64, 64)]
    moving = SimilarImageFilter(seed=0)  # the defaults: threshold 0.98, at most 10 skips in a row
    assert sum(moving.should_skip(f) for f in frames) <= 8  # 6 (21 when compared in [0, 1])
    still = SimilarImageFilter(seed=0)
    assert sum(still.should_skip(frames[0]) for _ in range(12)) == 10  # static input: every allowed skip
    # A grey frame with a faint pattern and its inverse: cos 0.95 in [0, 1], 0 as the model sees them.
    pattern = 0.1 * torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    decisions = []
    for seed in range(10):
        unrelated = SimilarImageFilter(threshold=0.9, seed=seed)
        unrelated.should_skip(0.6 + pattern)
        decisions.append(unrelated.should_skip(0.6 - pattern))
    assert not any(decisions)  # in [0, 1] each skipped with probability 0.46


def test_similar_image_filter_keeps_a_reference_across_setting_changes(sd15_models):
    """After a settings change there is no output to repeat, but the frame processed then is still
    the reference: the very next identical frame can be skipped."""
    frame = make_frames(1)[0]
    engine = engine_for(sd15_models, similar_image_filter=True, similar_image_filter_threshold=0.9,
                        num_inference_steps=1)
    engine(frame)
    engine.update(delta=0.5)
    engine(frame)  # new settings: processed, and the reference
    engine(frame)
    assert engine.frames_skipped == 1


def _scale_text_encoder(models, factor):
    final_norm = [m for m in models.text_encoders[0].modules() if isinstance(m, torch.nn.LayerNorm)][-1]
    with torch.no_grad():  # an in-place weight change, as a runtime LoRA scale makes
        final_norm.weight.mul_(factor)


def test_text_encoder_weight_change_reencodes_without_restarting_the_stream(sd15_models):
    frames = make_frames(5)
    engine = engine_for(sd15_models, num_inference_steps=3)
    for f in frames[:3]:
        engine(f)
    before = engine._prepared.prompt.embeds
    _scale_text_encoder(sd15_models, 2.0)
    try:
        engine.weights_changed(text_encoders=True)
        engine(frames[3])
        assert engine.output_lags  # the stream batch went on: no restart, no re-priming
        after = engine._prepared.prompt.embeds
        assert (after - before).abs().max() > 1e-3  # re-encoded with the new weights
    finally:
        _scale_text_encoder(sd15_models, 0.5)


def test_weights_changed_while_a_frame_encodes_its_prompt_is_not_lost(sd15_models):
    """weights_changed() comes from Scope's update thread, possibly while a frame encodes its prompt
    with the old weights: that frame's embeddings are rebuilt at the next call, once."""
    engine = engine_for(sd15_models, num_inference_steps=1)
    engine(make_frames(1)[0])
    encoder = engine.prompt_encoder
    original, blends = encoder.blend, []

    def blend_during_a_change(*args):
        blends.append(args)
        embeds = original(*args)  # with the old weights...
        if len(blends) == 1:  # ...which change before this frame is done
            _scale_text_encoder(sd15_models, 2.0)
            engine.weights_changed(text_encoders=True)
        return embeds

    encoder.blend = blend_during_a_change
    try:
        engine.update(prompts=(("a blue bird", 1.0),))
        engine(make_frames(1)[0])
        first = engine._prepared.prompt.embeds
        engine(make_frames(1)[0])
        assert len(blends) == 2  # the snapshot made during the change was rebuilt
        assert (engine._prepared.prompt.embeds - first).abs().max() > 1e-3
        engine(make_frames(1)[0])
        assert len(blends) == 2  # and only once
    finally:
        encoder.blend = original
        _scale_text_encoder(sd15_models, 0.5)


def test_similar_image_filter_is_seeded(sd15_models):
    frames = [f * 0.98 + 0.01 * i for i, f in enumerate(make_frames(1) * 12)]

    def decisions(seed):
        engine = engine_for(sd15_models, seed=seed, similar_image_filter=True,
                            similar_image_filter_threshold=0.99999, num_inference_steps=1)
        result = []
        for f in frames:
            before = engine.frames_skipped
            engine(f)
            result.append(engine.frames_skipped > before)
        return result

    assert decisions(5) == decisions(5)


def test_lcm_lora_and_tiny_vae_from_local_folders(tiny_sd15, tiny_lcm_lora, tiny_taesd, sd15_models):
    from scope_streamdiffusion.engine import load_models

    models = load_models(str(tiny_sd15), device=torch.device("cpu"), dtype=torch.float32, use_tiny_vae=True,
                         tiny_vae_id=str(tiny_taesd), use_lcm_lora=True, lcm_lora_id=str(tiny_lcm_lora))
    assert models.is_tiny_vae
    frame = make_frames(1)[0]
    latents = torch.randn(1, 4, 8, 8)
    t = torch.tensor([500])
    ehs = torch.randn(1, 77, 32)
    fused = models.unet(latents, t, encoder_hidden_states=ehs).sample
    plain = sd15_models.unet(latents, t, encoder_hidden_states=ehs).sample
    assert (fused - plain).abs().max() > 1e-4  # the LoRA is fused into the UNet weights
    out = engine_for(models)(frame)
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("cfg_type", [CfgType.SELF, CfgType.FULL])
def test_sdxl_batch_equals_sequential(sdxl_models, cfg_type):
    assert sdxl_models.family.is_sdxl
    frames = make_frames(4)
    expected = sequential_reference(sdxl_models, frames, cfg_type=cfg_type, num_inference_steps=2)
    engine = engine_for(sdxl_models, cfg_type=cfg_type, num_inference_steps=2)
    outs = [engine(f) for f in frames]
    for j in range(1, 4):
        assert (outs[j] - expected[j - 1]).abs().max() <= TOL
    txt = engine_for(sdxl_models)(None)
    assert torch.isfinite(txt).all()


def test_sdxl_fp16_keeps_the_vae_in_fp32(tiny_sdxl):
    from scope_streamdiffusion.engine import load_models

    models = load_models(str(tiny_sdxl), device=torch.device("cpu"), dtype=torch.float16, use_tiny_vae=False)
    assert models.vae_dtype == torch.float32 and models.dtype == torch.float16


@pytest.mark.parametrize("kind,model_id,scheduler,base,distilled", [
    ("sd15", "runwayml/stable-diffusion-v1-5", "PNDMScheduler", "sd15", False),
    ("sd15", "SimianLuo/LCM_Dreamshaper_v7", "LCMScheduler", "sd15", True),
    ("sd21", "stabilityai/stable-diffusion-2-1", "DDIMScheduler", "sd21", False),
    ("sd21", "stabilityai/sd-turbo", "EulerDiscreteScheduler", "sd21", True),
    ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "EulerDiscreteScheduler", "sdxl", False),
    ("sdxl", "stabilityai/sdxl-turbo", "EulerDiscreteScheduler", "sdxl", True),
    ("sdxl", "ByteDance/SDXL-Lightning", "EulerDiscreteScheduler", "sdxl", True),
])
def test_model_family_is_read_from_the_true_configs(kind, model_id, scheduler, base, distilled):
    from scope_streamdiffusion.engine.models import detect_family
    from scope_streamdiffusion.testing.architectures import build_unet

    unet = build_unet(kind, device="meta")  # the released UNet configs, no memory
    family = detect_family(dict(unet.config), model_id, scheduler)
    assert (family.base, family.distilled) == (base, distilled)


def test_sdxl_empty_negative_stays_zero_next_to_a_long_prompt(sdxl_models):
    assert sdxl_models.force_zeros_for_empty_prompt
    long_text = ", ".join(["a very detailed painting of a quiet harbour town at dawn"] * 12)
    engine = engine_for(sdxl_models, prompts=((long_text, 1.0),), negative_prompt="", cfg_type=CfgType.FULL)
    engine(make_frames(1)[0])
    p = engine._prepared
    assert p.negative.embeds.shape == p.prompt.embeds.shape and p.prompt.embeds.shape[1] >= 154
    assert not p.negative.embeds.any() and not p.negative.pooled.any()


@pytest.mark.parametrize("dtype,steps", [(torch.float16, 3), (torch.bfloat16, 50), (torch.float32, 1)])
def test_schedule_is_one_buffer_copied_and_cloned_whole(dtype, steps):
    from scope_streamdiffusion.engine.schedule import make_schedule, timesteps_from_strength

    abar = torch.linspace(0.999, 0.005, 1000)
    cpu = torch.device("cpu")
    timesteps = timesteps_from_strength(1.0, steps)
    sched = make_schedule(timesteps, abar, cpu, dtype)
    t = torch.tensor(timesteps)
    assert sched.timesteps.dtype == torch.long and sched.timesteps.tolist() == timesteps
    assert sched.alpha.dtype == dtype and sched.alpha.shape == sched.c_out.shape == (steps, 1, 1, 1)
    assert torch.equal(sched.alpha.flatten(), abar.double()[t].sqrt().to(dtype))
    assert torch.equal(sched.beta.flatten(), (1 - abar.double()[t]).sqrt().to(dtype))
    start, end = sched.storage.data_ptr(), sched.storage.data_ptr() + sched.storage.numel()
    assert all(start <= x.data_ptr() < end and x.data_ptr() % 16 == 0 for x in sched.tensors())  # one buffer
    static = sched.clone()
    assert static.storage.data_ptr() != sched.storage.data_ptr()
    assert all(torch.equal(a, b) for a, b in zip(static.tensors(), sched.tensors()))
    other = make_schedule(timesteps_from_strength(0.6, steps), abar, cpu, dtype)
    other.storage[-1] = 0xAB  # padding after c_out (or its last byte): only a copy of the whole buffer moves it
    static.copy_(other)
    assert torch.equal(static.storage, other.storage)
    assert all(torch.equal(a, b) for a, b in zip(static.tensors(), other.tensors()))
    assert sched.timesteps.tolist() == timesteps  # the source is never written


def test_schedule_copy_between_layouts_goes_field_by_field():
    from scope_streamdiffusion.engine.schedule import make_schedule

    abar = torch.linspace(0.999, 0.005, 1000)
    cpu = torch.device("cpu")
    half, single = make_schedule([999], abar, cpu, torch.float16), make_schedule([499], abar, cpu, torch.float32)
    assert half.storage.shape == single.storage.shape  # same bytes, other layout: no raw copy
    half.copy_(single)
    assert half.timesteps.tolist() == [499] and half.alpha.dtype == torch.float16
    assert torch.equal(half.alpha, single.alpha.half()) and torch.equal(half.c_out, single.c_out.half())
    rows = single.rows(slice(0, 1), 2)  # a slice is its own tensors again
    assert rows.storage is None and rows.timesteps.tolist() == [499, 499]
    target = make_schedule([999], abar, cpu, torch.float32).rows(slice(0, 1), 2).clone()
    target.copy_(rows)
    assert all(torch.equal(a, b) for a, b in zip(target.tensors(), rows.tensors()))


def test_x0_is_the_consistency_models_estimate_with_diffusers_scalings():
    """predict_x0 against the formula it implements, with diffusers' LCMScheduler's boundary scalings
    and SD's noise table: per row, c_out * (x - sqrt(1 - abar) * eps) / sqrt(abar) + c_skip * x."""
    from diffusers import LCMScheduler

    from scope_streamdiffusion.engine.sampling import predict_x0, slot_rows
    from scope_streamdiffusion.engine.schedule import make_schedule

    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    timesteps = [999, 759, 1, 0]  # c_skip ~0 down to t = 1 (2.5e-3), 1 at t = 0 (c_out 0): both terms count
    sched = make_schedule(timesteps, scheduler.alphas_cumprod, torch.device("cpu"), torch.float64)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    got = predict_x0(x, eps, sched)
    for i, t in enumerate(timesteps):
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        abar = scheduler.alphas_cumprod[t].double()
        want = c_out * (x[i] - (1 - abar).sqrt() * eps[i]) / abar.sqrt() + c_skip * x[i]
        assert torch.allclose(got[i], want, atol=1e-9), t
    assert float(scheduler.get_scalings_for_boundary_condition_discrete(0)[0]) == 1.0
    # One frame a slot: the rows are views of the schedule (no copy); more frames: each row repeated.
    one = sched.rows(slice(1, 3), 1)
    assert one.alpha.data_ptr() == sched.alpha[1:].data_ptr() and one.alpha.shape == (2, 1, 1, 1)
    two = sched.rows(slice(1, 3), 2)
    assert two.timesteps.tolist() == [759, 759, 1, 1]
    assert torch.equal(slot_rows(x, slice(2, 4), 1), x[2:4]) and slot_rows(x, slice(2, 4), 3).shape[0] == 6
