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
    fuse_projections,
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


def test_the_compiled_unet_does_not_guard_on_the_sharing_state():
    """Another thread running the UNet eagerly sets and clears the shared projections' state at any
    moment (background-compile: the frame thread's eager steps, the compiler's example calls). The
    compiled UNet must not depend on it: dynamo runs ``nn.Module.__call__`` (hooks included) outside
    the frame it compiles, so state set in a hook was a guard of the compiled forward, and another
    thread's call made it fail: that UNet call ran eagerly, into the CUDA graph captured from it."""
    import torch._dynamo

    counted = dict(runs=0)

    def backend(gm, _inputs):
        def run(*args):
            counted["runs"] += 1
            return gm.forward(*args)
        return run

    unet = _tiny_unet("sd15").eval()
    fuse_projections(unet)
    assert share_conditioning_projections(unet) == _expected_counts(unet)
    sample, t, kwargs = _unet_inputs("sd15")
    torch._dynamo.reset()
    # What background-compile compiles and how it runs it (run-only: a guard that fails runs eagerly).
    compiled = torch.compile(unet._call_impl, backend=backend, dynamic=False)
    with torch.no_grad():
        expected = compiled(sample, t, **kwargs).sample
        assert counted["runs"] == 1

        def another_threads_call_ended(*_):
            unet.time_projections.end()
            unet.prompt_projections.end()

        unet.register_forward_pre_hook(another_threads_call_ended)  # between __call__ and forward
        got = torch._dynamo.run(compiled)(sample, t, **kwargs).sample
    torch._dynamo.reset()
    assert counted["runs"] == 2  # the compiled code ran
    assert torch.equal(got, expected)
    assert unet.time_projections.memo is None and not unet.time_projections.active


def test_a_unet_with_a_forward_of_its_own_keeps_its_projections_apart():
    """Another library's forward on the instance would not set the shared results up: the layers
    would each compute their own columns while the counts said they were shared."""
    unet = _tiny_unet("sd15").eval()
    fuse_projections(unet)
    unet.forward = unet.forward  # bound, on the instance (as hook libraries install theirs)
    assert share_conditioning_projections(unet) == {}
    assert not any(isinstance(m, SharedInputMember) for m in unet.modules())
