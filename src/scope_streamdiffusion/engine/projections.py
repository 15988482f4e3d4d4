"""Fewer, fuller GEMMs in the UNet's linear projections (graph modes; the same function).

At one frame per call the UNet's GEMMs are small, and on a fast GPU many small kernels cost more
than their arithmetic. Two rewrites, both applied at load by :func:`.acceleration.accelerate`:

* :func:`fuse_projections`: each attention's query/key/value projections as one GEMM.
* :func:`share_conditioning_projections`: the projections that, in one UNet call, all read the
  same input (every ResNet's time-embedding projection reads the time embedding; every
  cross-attention's key/value projection reads the prompt embeddings) as ONE GEMM per input: 22
  GEMMs + 22 SiLUs and 16 GEMMs become two GEMMs and one SiLU in SD2.1, 70 key/value GEMMs become
  one in SDXL.

Both keep the separate layers' weights as views of the fused ones (one copy in memory, state-dict
keys unchanged), and both are left out with runtime LoRA adapters (they sit on the separate layers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fuse_projections(unet) -> bool:
    """One GEMM for each self-attention's query, key and value (and each cross-attention's key and
    value) instead of three (two): fewer, fuller kernels at one frame. Not with runtime LoRA adapters
    (they sit on the separate projections). False where the model has no such attention."""
    try:
        from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0
    except ImportError:
        return False
    processors = getattr(unet, "attn_processors", {})
    if not processors or any("Added" in type(p).__name__ for p in processors.values()):
        return False  # added KV projections (not in SD/SDXL UNets): diffusers cannot fuse them
    # What UNet2DConditionModel.fuse_qkv_projections() does, one attention at a time: diffusers
    # copies the weights into the fused layer and keeps the separate ones (+1.3 GB for SDXL in fp16).
    # Here the separate ones become views of the fused weights at once, so memory never holds both
    # for more than one layer, and whatever still reads them (LoRA tooling, unfusing) sees the same values.
    unet.original_attn_processors = processors
    for module in unet.modules():
        if not isinstance(module, Attention):
            continue
        module.fuse_projections(fuse=True)
        if module.is_cross_attention:
            fused, parts = module.to_kv, [module.to_k, module.to_v]
        else:
            fused, parts = module.to_qkv, [module.to_q, module.to_k, module.to_v]
        fused.requires_grad_(False)
        _views_of(fused, parts)
    unet.set_attn_processor(FusedAttnProcessor2_0())
    return True


def _views_of(whole: torch.nn.Linear, parts: list[torch.nn.Linear]) -> None:
    """Make ``parts``' weights and biases views of ``whole``'s rows (their concatenation)."""
    for name in ("weight", "bias"):
        fused = getattr(whole, name)
        if fused is None:
            continue
        rows = fused.data.split([getattr(part, name).shape[0] for part in parts])
        for part, view in zip(parts, rows):
            setattr(part, name, torch.nn.Parameter(view, requires_grad=False))


class SharedInputProjection(torch.nn.Module):
    """Linear layers that, during one call of their model, all read the same input: the first one
    called computes all of them in one GEMM, the others take their columns of that result.

    The result lives only while the model's call runs (hooks on the model set and clear it), so
    calling a member on its own, outside such a call, computes just that member. ``act`` (the time
    embedding's SiLU, which every ResNet applied before its own projection) runs once, in here.
    """

    def __init__(self, layers: list[torch.nn.Linear], act: torch.nn.Module | None = None):
        super().__init__()
        weight = torch.cat([layer.weight.detach() for layer in layers])
        has_bias = layers[0].bias is not None
        self.whole = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
        self.whole.weight = torch.nn.Parameter(weight, requires_grad=False)
        if has_bias:
            self.whole.bias = torch.nn.Parameter(torch.cat([layer.bias.detach() for layer in layers]),
                                                 requires_grad=False)
        self.act = act
        self.active = False
        self.memo: tuple[torch.Tensor, torch.Tensor] | None = None

    def begin(self, *_args, **_kwargs) -> None:
        self.active, self.memo = True, None

    def end(self, *_args, **_kwargs) -> None:
        self.active, self.memo = False, None

    def columns(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        # (input, result) in one attribute, read once: used only for the very tensor it was computed
        # from, so a call on another thread (the background compiler runs the model too) or with
        # another input computes its own.
        memo = self.memo
        if memo is None or memo[0] is not x:
            memo = self.memo = (x, self.whole(self.act(x) if self.act is not None else x))
        return memo[1][..., start:stop]


class SharedInputMember(torch.nn.Linear):
    """One of a :class:`SharedInputProjection`'s layers; its own weights are views of the shared ones."""

    def __init__(self, layer: torch.nn.Linear, start: int, act: torch.nn.Module | None):
        super().__init__(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        self.weight, self.bias = layer.weight, layer.bias
        self.start, self.stop, self.act = start, start + layer.out_features, act
        self._shared: tuple[SharedInputProjection] = ()  # a tuple: not a submodule of each member

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._shared and self._shared[0].active:
            return self._shared[0].columns(x, self.start, self.stop)
        return F.linear(self.act(x) if self.act is not None else x, self.weight, self.bias)


def _share(unet, name: str, owners: list[tuple[torch.nn.Module, str]], act=None) -> int:
    """Replace ``owner.<attr>`` for each (owner, attr) by members of one shared projection."""
    layers = [getattr(owner, attr) for owner, attr in owners]
    kinds = {(layer.in_features, layer.bias is None, layer.weight.dtype, layer.weight.device) for layer in layers}
    if len(layers) < 2 or len(kinds) != 1:
        return 0
    shared = SharedInputProjection(layers, act)
    _views_of(shared.whole, layers)
    start = 0
    for (owner, attr), layer in zip(owners, layers):
        member = SharedInputMember(layer, start, act)
        member._shared = (shared,)
        setattr(owner, attr, member)
        start = member.stop
    unet.add_module(name, shared)
    # always_call: a call that raises still clears the result, so nothing stale outlives a call.
    unet.register_forward_pre_hook(shared.begin)
    unet.register_forward_hook(shared.end, always_call=True)
    return len(layers)


def share_conditioning_projections(unet) -> dict[str, int]:
    """One GEMM for all ResNets' time-embedding projections and one for all cross-attentions'
    key/value projections (after :func:`fuse_projections`), for diffusers' ``UNet2DConditionModel``.

    Returns how many layers each shared projection took ({} where none applies). Exactly the same
    function: in that UNet every ResNet receives the same time embedding and every cross-attention
    the same ``encoder_hidden_states`` (no per-attention ``norm_cross`` in SD/SDXL; attentions with
    one are left alone)."""
    try:
        from diffusers import UNet2DConditionModel
        from diffusers.models.attention_processor import Attention
        from diffusers.models.resnet import ResnetBlock2D
    except ImportError:
        return {}
    if type(unet) is not UNet2DConditionModel or any(hasattr(unet, n) for n in ("time_projections", "prompt_projections")):
        return {}
    shared = {}
    resnets = [m for m in unet.modules() if isinstance(m, ResnetBlock2D) and isinstance(m.time_emb_proj, torch.nn.Linear)
               and not m.skip_time_act]
    acts = {type(m.nonlinearity) for m in resnets}
    if len(acts) == 1:
        act = resnets[0].nonlinearity
        count = _share(unet, "time_projections", [(m, "time_emb_proj") for m in resnets], act)
        if count:
            for m in resnets:
                m.skip_time_act = True  # the SiLU runs once, in the shared projection
            shared["time"] = count
    kv_owners = [(m, "to_kv") for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention
                 and isinstance(getattr(m, "to_kv", None), torch.nn.Linear) and m.norm_cross is None]
    count = _share(unet, "prompt_projections", kv_owners)
    if count:
        for attn, _ in kv_owners:  # the separate key and value layers: views of the new storage too
            _views_of(attn.to_kv, [attn.to_k, attn.to_v])
        shared["prompt"] = count
    return shared
