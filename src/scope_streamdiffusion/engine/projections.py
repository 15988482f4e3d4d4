"""Fewer, fuller GEMMs in the UNet's linear projections (graph modes; the same function).

At one frame per call the UNet's GEMMs are small, and on a fast GPU many small kernels cost more
than their arithmetic. Two rewrites, both applied at load by :func:`.acceleration.accelerate`:

* :func:`fuse_projections`: each attention's query/key/value projections as one GEMM.
* :func:`share_conditioning_projections`: the projections that, in one UNet call, all read the
  same input (every ResNet's time-embedding projection reads the time embedding; every
  cross-attention's key/value projection reads the prompt embeddings) as ONE GEMM per input: 22
  GEMMs + 22 SiLUs and 16 GEMMs become two GEMMs and one SiLU in SD2.1, 70 key/value GEMMs become
  one in SDXL.

Both keep the separate layers' weights as views of the fused ones (one copy in memory, the
separate layers' state-dict keys kept), and both are left out with runtime LoRA adapters (they sit
on the separate layers).
"""

from __future__ import annotations

import types

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

    The result lives only while the model's forward runs (:func:`_forward_sharing_projections` sets
    and clears it), so calling a member on its own, outside such a call, computes just that member.
    ``act`` (the time embedding's SiLU, which every ResNet applied before its own projection) runs
    once, in here.
    """

    def __init__(self, layers: list[torch.nn.Linear], act: torch.nn.Module | None = None):
        super().__init__()
        first = layers[0]
        rows = sum(layer.out_features for layer in layers)
        # Empty storage that _share copies the layers' weights into one at a time: never two full
        # copies in memory.
        for name in ("weight", "bias"):
            like = getattr(first, name)
            empty = None if like is None else torch.empty((rows, *like.shape[1:]), dtype=like.dtype, device=like.device)
            self.register_parameter(name, None if empty is None else torch.nn.Parameter(empty, requires_grad=False))
        self.act = act
        self.active = False
        self.memo: tuple[torch.Tensor, torch.Tensor] | None = None

    def begin(self) -> None:
        self.active, self.memo = True, None

    def end(self) -> None:
        self.active, self.memo = False, None

    def columns(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        # (input, result) in one attribute, read once: used only for the very tensor it was computed
        # from, so a call on another thread (the background compiler runs the model too) or with
        # another input computes its own. (A compiled call also writes back active=False at its end,
        # which can make a concurrent eager call's remaining members compute their own: slower once,
        # never wrong.)
        memo = self.memo
        if memo is None or memo[0] is not x:
            memo = self.memo = (x, F.linear(self.act(x) if self.act is not None else x, self.weight, self.bias))
        return memo[1][..., start:stop]


class SharedInputMember(torch.nn.Linear):
    """One of a :class:`SharedInputProjection`'s layers; its own weights are views of the shared ones."""

    def __init__(self, layer: torch.nn.Linear, shared: SharedInputProjection, start: int):
        super().__init__(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        self.weight, self.bias = layer.weight, layer.bias
        self.start, self.stop, self.act = start, start + layer.out_features, shared.act
        self._shared: tuple[SharedInputProjection, ...] = (shared,)  # a tuple: not a submodule of each member

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._shared[0].active:
            return self._shared[0].columns(x, self.start, self.stop)
        return F.linear(self.act(x) if self.act is not None else x, self.weight, self.bias)


def _share(unet, name: str, owners: list[tuple[torch.nn.Module, str]], act=None, rebind=None) -> int:
    """Replace ``owner.<attr>`` for each (owner, attr) by members of one shared projection, moving
    each layer's weights into the shared storage (then ``rebind(owner)``, for other views of them)."""
    layers = [getattr(owner, attr) for owner, attr in owners]
    kinds = {(layer.in_features, layer.bias is None, layer.weight.dtype, layer.weight.device) for layer in layers}
    if len(layers) < 2 or len(kinds) != 1:
        return 0
    shared = SharedInputProjection(layers, act)
    start = 0
    for (owner, attr), layer in zip(owners, layers):
        for param in ("weight", "bias"):
            whole = getattr(shared, param)
            if whole is not None:
                view = whole.data[start:start + layer.out_features]
                view.copy_(getattr(layer, param).detach())
                setattr(layer, param, torch.nn.Parameter(view, requires_grad=False))
        member = SharedInputMember(layer, shared, start)
        setattr(owner, attr, member)
        if rebind is not None:
            rebind(owner)  # before the next layer: the old storage goes now
        start = member.stop
    unet.add_module(name, shared)
    return len(layers)


def _forward_sharing_projections(unet, *args, **kwargs):
    """The UNet's forward, with its shared projections' results set up and cleared around it.

    In the forward itself, not in hooks on the module: compiled, the reset and the members' reads of
    it are then one traced frame (dynamo runs ``nn.Module.__call__``, hooks included, outside the
    frames it compiles), so no guard of the compiled code depends on this state. From a hook, the
    compiled forward guarded on the flag at its entry, and a compilation on another thread, setting
    and clearing the flag for its own example calls, made the frame thread's compiled UNet fail its
    guards and run eagerly (BENCHMARKS.md, R14). A forward set on the UNet later must call this one
    (accelerate's and diffusers' hooks do), or the layers compute their own columns: slower, the same."""
    shared = [m for m in (getattr(unet, "time_projections", None), getattr(unet, "prompt_projections", None))
              if m is not None]
    for projection in shared:
        projection.begin()
    try:
        return type(unet).forward(unet, *args, **kwargs)
    finally:  # a call that raises still clears the results: nothing stale outlives a call
        for projection in shared:
            projection.end()


def _share_time_projections(unet) -> int:
    """Every ResNet's time-embedding projection (SiLU, then its linear layer) as one GEMM: in a
    ``UNet2DConditionModel`` call every ResNet receives the same time embedding."""
    from diffusers.models.resnet import ResnetBlock2D

    resnets = [m for m in unet.modules() if isinstance(m, ResnetBlock2D) and isinstance(m.time_emb_proj, torch.nn.Linear)
               and not m.skip_time_act]
    if len({repr(m.nonlinearity) for m in resnets}) != 1:  # one activation, the same settings
        return 0
    count = _share(unet, "time_projections", [(m, "time_emb_proj") for m in resnets], resnets[0].nonlinearity)
    if count:
        for m in resnets:
            m.skip_time_act = True  # the SiLU runs once, in the shared projection
    return count


def _share_prompt_projections(unet) -> int:
    """Every cross-attention's key/value projection (fused by :func:`fuse_projections`) as one GEMM:
    every cross-attention receives the same ``encoder_hidden_states`` (those with a ``norm_cross``
    of their own, none in SD/SDXL, are left alone)."""
    from diffusers.models.attention_processor import Attention

    owners = [(m, "to_kv") for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention
              and isinstance(getattr(m, "to_kv", None), torch.nn.Linear) and m.norm_cross is None]
    # The separate key and value layers are views of to_kv's weights: make them views of the new storage.
    return _share(unet, "prompt_projections", owners, rebind=lambda attn: _views_of(attn.to_kv, [attn.to_k, attn.to_v]))


def share_conditioning_projections(unet) -> dict[str, int]:
    """One GEMM for all ResNets' time-embedding projections and one for all cross-attentions'
    key/value projections (after :func:`fuse_projections`), for diffusers' ``UNet2DConditionModel``;
    once per UNet, after its last ``.to()`` (a move copies each parameter on its own, so the
    separate layers would no longer be views of the shared weights).

    Returns how many layers each shared projection took ({} where none applies). Exactly the same
    function, up to the GEMMs' rounding."""
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        return {}
    if type(unet) is not UNet2DConditionModel or any(hasattr(unet, n) for n in ("time_projections", "prompt_projections")):
        return {}
    if "forward" in vars(unet):  # a forward of its own (hooks of another library): it would not set the results up
        return {}
    counts = dict(time=_share_time_projections(unet), prompt=_share_prompt_projections(unet))
    counts = {name: count for name, count in counts.items() if count}
    if counts:
        unet.forward = types.MethodType(_forward_sharing_projections, unet)
    return counts
