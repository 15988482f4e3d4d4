"""Long attentions with their keys split in parts (engine/attention_split.py): the choice of parts from
the tile count, and the rewrite through inductor on the CPU (PyTorch's CPU flash attention stands in
for cuDNN's: the pass rewrites either the same way) giving the attention it replaced."""

import pytest
import torch
import torch.nn.functional as F
from torch._inductor import config as inductor_config

from scope_streamdiffusion.engine.attention_split import (
    AttentionKeysSplit,
    attention_split_options,
    key_parts,
    part_choices,
    predicted_us,
    split_attention_keys,
)


@pytest.mark.parametrize("heads, tokens, width, parts", [
    (5, 4096, 64, 4),   # SD2.1's 64x64 level at one 512² frame: 160 tiles, 2 rounds -> 5 of a quarter
    (10, 1024, 64, 1),  # its 32x32 level: 80 tiles, one round already (measured slower split)
    (20, 256, 64, 1),   # its 16x16 level: too short for the combination to pay
    (20, 4096, 64, 1),  # 640 tiles (as LCM's 4 rows): five full rounds, nothing to gain
    (10, 4096, 64, 1),  # SDXL's 64x64 level at 1024²: 3 rounds -> 2.5, less than the gain asked for
    (5, 1024, 64, 1),   # SD2.1 at 256²: 40 tiles, a microsecond or two at most
])
def test_parts_follow_the_rounds(heads, tokens, width, parts):
    tiles = heads * tokens // 128
    assert key_parts(tiles, tokens, heads * tokens * width, 132) == parts


def test_the_model_against_the_probe():
    """BENCHMARKS.md, R19: cuDNN's kernel alone at the 64x64 level took 75.1 / 59.0 / 52.4 µs whole and
    in 2 and 4 parts; with the combination, in a graph, 76.1 / 62.7 / 60.8; at 1,024 keys (80 tiles)
    whole was fastest (14.0 against 17.2 / 19.1)."""
    rounds_only = [predicted_us(160, 4096, 0, 132, p) - (0 if p == 1 else 2.0) for p in (1, 2, 4)]
    assert [abs(m - k) / k for m, k in zip(rounds_only, (75.1, 59.0, 52.4))] < [0.05] * 3
    assert all(abs(predicted_us(160, 4096, 4096 * 320, 132, p) - us) < 2.5 for p, us in ((1, 76.1), (2, 62.7), (4, 60.8)))
    at_1024 = [predicted_us(80, 1024, 1024 * 640, 132, p) for p in (1, 2, 4)]
    assert at_1024[0] == min(at_1024)


def test_parts_are_never_shorter_than_a_tile():
    assert part_choices(4096) == [2, 4] and part_choices(256) == [2] and part_choices(255) == []
    assert part_choices(254) == []  # 127 keys a part


def test_no_pass_on_the_cpu():
    assert attention_split_options(torch.device("cpu")) == {}


class SelfAttention(torch.nn.Module):
    """q, k, v from one fused projection, as the pipeline's UNet lays them out."""

    def __init__(self, channels=64, heads=2, scale=None):
        super().__init__()
        self.heads, self.scale = heads, scale
        self.qkv, self.out = torch.nn.Linear(channels, 3 * channels), torch.nn.Linear(channels, channels)

    def forward(self, x):
        rows, tokens, channels = x.shape
        q, k, v = self.qkv(x).view(rows, tokens, 3, self.heads, -1).unbind(2)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=self.scale)
        return self.out(attended.transpose(1, 2).reshape(rows, tokens, channels))


@pytest.mark.parametrize("parts, gain, scale, dtype", [
    (2, 1, None, torch.float32), (4, 1, None, torch.float32),
    (4, 40, None, torch.float32),  # log-sum-exps in the hundreds, past what exp() holds in float32
    (2, 1, 0.3, torch.float32),    # the attention's own scale carried into the split call
    (2, 1, None, torch.bfloat16),  # the mix computed in float32, the output in the input's dtype
])
def test_split_through_inductor_is_the_attention(parts, gain, scale, dtype):
    torch.manual_seed(0)
    module = SelfAttention(scale=scale).eval().to(dtype)
    # one key set with a dominant key in the last part: the parts' weights must carry its mass
    x = (torch.randn(1, 256, 64) * gain).to(dtype)
    x[0, -1] *= 8
    with torch.no_grad():
        expected = module(x)
        counts = {}
        torch._dynamo.reset()
        with inductor_config.patch({"post_grad_custom_pre_pass": AttentionKeysSplit(132, counts, parts),
                                    "force_disable_caches": True}):
            got = torch.compile(module, fullgraph=True, dynamic=False)(x)
        torch._dynamo.reset()
    assert counts == {"graphs": 1, "split": 1}
    assert got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - expected.float()).abs().max().item() < tolerance * expected.float().abs().max().item()


def _attention_graph(rows=1, tokens=512, heads=2, width=32, queries=None, kv_heads=None, dtype=torch.float32,
                     direct=None, read_lse=False, **sdpa):
    """The ATen graph of one attention (as the pass sees it) on fake tensors: ``queries`` (default
    ``tokens``) against ``tokens`` keys; ``sdpa``: more arguments to it. ``direct``: the CPU kernel called
    with these arguments after q, k, v (dropout, causal: what SDPA sends elsewhere on a CPU), its output
    returned, or with ``read_lse`` both its outputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def attend(q, k, v):
        if direct is not None:
            out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, *direct)
            return out if read_lse else out[0]
        return F.scaled_dot_product_attention(q, k, v, **sdpa)

    with FakeTensorMode():
        q = torch.empty(rows, heads, queries or tokens, width, dtype=dtype)
        k, v = (torch.empty(rows, kv_heads or heads, tokens, width, dtype=dtype) for _ in range(2))
        return make_fx(attend, tracing_mode="real")(q, k, v).graph


def _batches(graph):
    return [n.args[0].meta["val"].shape[0] for n in graph.nodes
            if n.target is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default]


def test_the_pass_counts_tiles():
    graph = _attention_graph(tokens=4096, heads=5, width=64, dtype=torch.float16)  # SD2.1's 64x64 level
    assert split_attention_keys(graph, 132) == 1
    assert _batches(graph) == [4]  # the parts in the batch dimension of one call
    graph = _attention_graph(tokens=1024, heads=10, width=64, dtype=torch.float16)  # its 32x32 level: one round
    assert split_attention_keys(graph, 132) == 0
    assert _batches(graph) == [1]
    # 16,897 queries: 133 tiles (two rounds, the second of one tile), where 16,896 fill one round
    assert split_attention_keys(_attention_graph(tokens=4096, queries=16897, heads=1, width=64, dtype=torch.float16), 132) == 1
    assert split_attention_keys(_attention_graph(tokens=4096, queries=16896, heads=1, width=64, dtype=torch.float16), 132) == 0


@pytest.mark.parametrize("case", [
    dict(width=40),                # heads the model was not fitted to
    dict(dtype=torch.bfloat16),    # its rounding of each part is not far below the gain
    dict(dtype=torch.float32),     # not a kernel the model describes
])
def test_the_model_keeps_to_what_it_was_fitted_on(case):
    graph = _attention_graph(**{**dict(tokens=4096, heads=5, width=64, dtype=torch.float16), **case})
    assert split_attention_keys(graph, 132) == 0


@pytest.mark.parametrize("case", [
    dict(rows=2),                         # the queries would need a copy a part
    dict(kv_heads=1, enable_gqa=True),    # grouped heads
    dict(is_causal=True),
    dict(direct=(0.1,)),                  # dropout
    dict(direct=(0.0, True)),             # causal, given positionally
    dict(masked=True),
    dict(direct=(), read_lse=True),       # the log-sum-exps read: the node's other output
])
def test_attentions_that_are_not_bare_are_left_whole(case):
    graph = _masked_graph() if case.get("masked") else _attention_graph(tokens=4096, heads=5, width=64, **case)
    before = _batches(graph)
    assert before  # still the kernel the pass knows
    assert split_attention_keys(graph, 132, parts=2) == 0
    assert _batches(graph) == before


def _masked_graph():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def attend(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    with FakeTensorMode():
        args = [torch.empty(1, 5, 4096, 64) for _ in range(3)] + [torch.zeros(4096, 4096)]
        return make_fx(attend, tracing_mode="real")(*args).graph


def test_a_rewrite_that_fails_leaves_the_attention_whole(monkeypatch, caplog):
    """The split only buys speed: an unforeseen graph must not fail the compilation."""
    from scope_streamdiffusion.engine import attention_split

    def broken(op, parts, scale):
        def split(q, k, v):
            raise RuntimeError("unforeseen")
        return split

    monkeypatch.setattr(attention_split, "_split_attention", broken)
    graph = _attention_graph(tokens=4096, heads=5, width=64, dtype=torch.float16)
    with caplog.at_level("WARNING", logger=attention_split.__name__):
        assert split_attention_keys(graph, 132) == 0
    assert _batches(graph) == [1]
    graph.lint()
    assert [r.getMessage() for r in caplog.records] == ["an attention of 4096 keys left whole (RuntimeError: unforeseen)"]
