"""The UNet's projections that read one input, as one GEMM (engine/projections.py): the same function,
one copy of the weights, fewer GEMMs in what torch.compile traces."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import make_frames
from scope_streamdiffusion.engine import CfgType, StreamDiffusion, StreamSettings, load_models
from scope_streamdiffusion.engine.projections import (
    SharedInputMember,
    TimestepProjectionTable,
    fuse_projections,
    precompute_conditioning,
    prompt_projector,
    share_conditioning_projections,
)
from scope_streamdiffusion.testing.tiny_models import _tiny_unet

CPU = torch.device("cpu")


def _expected_counts(unet) -> dict:
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    return dict(time=sum(isinstance(m, ResnetBlock2D) for m in unet.modules()),
                prompt=sum(isinstance(m, Attention) and m.is_cross_attention for m in unet.modules()))


def _storage_bytes(module) -> int:
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in module.parameters()}.values())


def _unet_inputs(family: str, rows: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(encoder_hidden_states=torch.randn(rows, 77, 64 if family == "sdxl" else 32, generator=g))
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(rows, 32, generator=g),
                                       "time_ids": torch.randn(rows, 6, generator=g)}
    return torch.randn(rows, 4, 8, 8, generator=g), torch.tensor([999, 301][:rows]), kwargs


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_shared_projections_compute_the_same_frames_with_one_copy_of_the_weights(family, request):
    folder = request.getfixturevalue(f"tiny_{family}")
    models = load_models(str(folder), device=CPU, dtype=torch.float32, use_tiny_vae=False)
    frames = make_frames(4)

    def stream():  # 2 steps x (uncond, cond): UNet rows with different timesteps and prompts
        engine = StreamDiffusion(models, width=64, height=64, settings=StreamSettings(
            num_inference_steps=2, cfg_type=CfgType.FULL, guidance_scale=1.5, prompts=(("a red fox", 1.0),)))
        return [engine(f) for f in frames]

    assert fuse_projections(models.unet)
    before, memory, keys = stream(), _storage_bytes(models.unet), set(models.unet.state_dict())
    assert share_conditioning_projections(models.unet) == _expected_counts(models.unet)
    assert share_conditioning_projections(models.unet) == {}  # once only
    after = stream()
    assert max((a - b).abs().max().item() for a, b in zip(before, after)) <= 1e-5
    # The separate layers' weights are views of the shared ones: no second copy, the same keys.
    assert _storage_bytes(models.unet) == memory
    assert keys <= set(models.unet.state_dict())
    for shared in (models.unet.time_projections, models.unet.prompt_projections):
        assert shared.memo is None and not shared.active  # nothing outlives a call


def test_a_member_takes_the_shared_result_only_for_the_input_it_was_computed_from():
    """Outside a UNet call a member computes its own columns; inside one, the shared result serves
    only the very tensor it was computed from (another thread's call, another input: its own)."""
    unet = _tiny_unet("sd15").eval()
    fuse_projections(unet)
    originals = {name: copy.deepcopy(m) for name, m in unet.named_modules() if name.endswith("time_emb_proj")}
    share_conditioning_projections(unet)
    members = {name: m for name, m in unet.named_modules() if name.endswith("time_emb_proj")}
    assert all(isinstance(m, SharedInputMember) for m in members.values())
    shared = unet.time_projections
    x, y = torch.randn(2, 128), torch.randn(2, 128)

    def own(name, inp):  # what the ResNet computed before: SiLU, then its own projection
        return originals[name](F.silu(inp))

    with torch.no_grad():
        for name, member in members.items():
            assert torch.allclose(member(x), own(name, x), atol=1e-6)
        assert shared.memo is None
        shared.begin()
        (first, a), (second, b), (third, c) = list(members.items())[:3]
        assert torch.allclose(a(x), own(first, x), atol=1e-6) and shared.memo[0] is x
        assert torch.allclose(b(y), own(second, y), atol=1e-6)  # not x's result
        assert torch.allclose(c(x.clone()), own(third, x), atol=1e-6)  # equal values, another tensor
        shared.end()
    assert shared.memo is None and not shared.active


def test_a_unet_call_that_raises_leaves_nothing_behind():
    unet = _tiny_unet("sd15").eval()
    fuse_projections(unet)
    share_conditioning_projections(unet)
    sample, t, kwargs = _unet_inputs("sd15")
    kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"][..., :7]  # fails in the first attention
    with torch.no_grad(), pytest.raises(RuntimeError):
        unet(sample, t, **kwargs)
    for shared in (unet.time_projections, unet.prompt_projections):
        assert shared.memo is None and not shared.active


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_torch_compile_traces_one_graph_with_one_gemm_per_shared_input(family):
    """What inductor gets from dynamo: no graph break, no recompilation for new inputs, and the
    shared layers' GEMMs are one each."""
    import torch._dynamo

    linears = (torch._C._nn.linear, F.linear)

    def trace(unet):
        graphs = []

        def backend(gm, _inputs):
            graphs.append(sum(n.op == "call_function" and n.target in linears for n in gm.graph.nodes))
            return gm.forward

        torch._dynamo.reset()
        unet.compile(backend=backend, dynamic=False)
        with torch.no_grad():
            out = unet(sample, t, **kwargs).sample
            # New tensors of the same shapes, as every frame brings: no recompilation (guards hold).
            other_sample, other_t, other_kwargs = _unet_inputs(family, seed=1)
            unet(other_sample, other_t, **other_kwargs)
        unet._compiled_call_impl = None
        return graphs, out

    torch.manual_seed(0)
    unet = _tiny_unet(family).eval()
    sample, t, kwargs = _unet_inputs(family)
    fuse_projections(unet)
    graphs_fused, expected = trace(unet)
    counts = share_conditioning_projections(unet)
    graphs_shared, got = trace(unet)
    assert len(graphs_fused) == len(graphs_shared) == 1
    assert graphs_shared[0] == graphs_fused[0] - (counts["time"] - 1) - (counts["prompt"] - 1)
    assert torch.allclose(got, expected, atol=1e-5)
    assert unet.time_projections.memo is None and not unet.time_projections.active


@pytest.mark.parametrize("family", ["sd15", "sd15_v", "sdxl"])
def test_precomputed_conditioning_gives_the_same_frames(family, request):
    """The time projections as a table over the timesteps and the prompt's key/value projection
    made by the stream: the frames of the shared projections (2 steps, full CFG: rows with other
    timesteps and prompts; v-prediction; SDXL, whose time embedding reads the prompt: no table)."""
    folder = request.getfixturevalue(f"tiny_{family}")
    models = load_models(str(folder), device=CPU, dtype=torch.float32, use_tiny_vae=False)
    frames = make_frames(4)

    def stream():
        engine = StreamDiffusion(models, width=64, height=64, settings=StreamSettings(
            num_inference_steps=2, cfg_type=CfgType.FULL, guidance_scale=1.5, prompts=(("a red fox", 1.0),),
            negative_prompt="blurry"))
        return [engine(f) for f in frames]

    fuse_projections(models.unet)
    share_conditioning_projections(models.unet)
    before, keys = stream(), set(models.unet.state_dict())
    assert prompt_projector(models.unet) is None
    done = precompute_conditioning(models.unet, len(models.alphas_cumprod))
    assert done == dict(time=family != "sdxl", prompt=True)
    assert precompute_conditioning(models.unet, len(models.alphas_cumprod)) == dict(time=False, prompt=False)  # once
    assert isinstance(models.unet.time_proj, TimestepProjectionTable) == done["time"]
    if done["time"]:
        table = models.unet.time_proj.table
        assert table.shape == (len(models.alphas_cumprod), models.unet.time_projections.weight.shape[0])
    assert prompt_projector(models.unet) is not None
    after = stream()
    assert max((a - b).abs().max().item() for a, b in zip(before, after)) <= 1e-5
    assert set(models.unet.state_dict()) == keys  # the table is derived, not saved


def test_the_time_table_holds_each_timesteps_projections_and_clamps_the_rest():
    """Row t is what the time embedding and the shared projection compute for timestep t (float64:
    exact but for the GEMMs' summation order); a timestep outside the table takes its nearest row
    rather than stopping the stream."""
    unet = _tiny_unet("sd15").eval().double()
    fuse_projections(unet)
    share_conditioning_projections(unet)
    time_proj, embedding, shared = unet.time_proj, unet.time_embedding, unet.time_projections
    t = torch.tensor([0, 1, 301, 998, 999])
    with torch.no_grad():
        expected = shared.project(embedding(time_proj(t).double()))
        assert precompute_conditioning(unet, 1000)["time"]
        assert torch.allclose(unet.time_proj(t), expected, rtol=0, atol=1e-12)
        assert torch.equal(unet.time_proj(torch.tensor([-5, 1000, 4000])), unet.time_proj(torch.tensor([0, 999, 999])))
        # The embedding's layers stay under their keys, unused.
        assert unet.time_embedding.linear_1 is embedding.linear_1


def test_precomputing_needs_the_shared_projections_of_every_reader():
    unet = _tiny_unet("sd15").eval()
    assert precompute_conditioning(unet, 1000) == dict(time=False, prompt=False)  # nothing shared
    fuse_projections(unet)
    share_conditioning_projections(unet)
    # A ResNet whose time projection is not a member would receive a table row as its time embedding.
    resnet = next(m for m in unet.modules() if isinstance(getattr(m, "time_emb_proj", None), SharedInputMember))
    member = resnet.time_emb_proj
    resnet.time_emb_proj = torch.nn.Linear(member.in_features, member.out_features)
    assert precompute_conditioning(unet, 1000) == dict(time=False, prompt=True)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_torch_compile_traces_no_conditioning_gemm_once_precomputed(family):
    """What inductor gets: one graph, no recompilation for new inputs, and neither the time
    embedding's layers nor the two shared GEMMs (SDXL: the prompt's only)."""
    import torch._dynamo

    linears = (torch._C._nn.linear, F.linear)

    def trace(unet, prompt):
        graphs = []

        def backend(gm, _inputs):
            graphs.append(sum(n.op == "call_function" and n.target in linears for n in gm.graph.nodes))
            return gm.forward

        torch._dynamo.reset()
        unet.compile(backend=backend, dynamic=False)
        with torch.no_grad():
            outs = []
            for sample, t, kwargs in (_unet_inputs(family), _unet_inputs(family, seed=1)):
                kwargs["encoder_hidden_states"] = prompt(kwargs["encoder_hidden_states"])
                outs.append(unet(sample, t, **kwargs).sample)
        unet._compiled_call_impl = None
        return graphs, outs

    torch.manual_seed(0)
    unet = _tiny_unet(family).eval()
    fuse_projections(unet)
    share_conditioning_projections(unet)
    graphs_shared, expected = trace(unet, lambda ehs: ehs)
    done = precompute_conditioning(unet, 1000)
    graphs_pre, got = trace(unet, prompt_projector(unet))
    assert len(graphs_shared) == len(graphs_pre) == 1
    assert graphs_pre[0] == graphs_shared[0] - 1 - (3 if done["time"] else 0)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, expected))
