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


def test_the_fit_reproduces_the_measurements():
    """The model's figures for the probe's cases (BENCHMARKS.md, R19): the kernel at 4,096 keys in 1,
    2 and 4 parts with its combination 76.1 / 62.7 / 60.8 µs, at 1,024 keys 13.8 / 17.0 / 20.1."""
    at_4096 = [predicted_us(160, 4096, 4096 * 320, 132, p) for p in (1, 2, 4)]
    assert at_4096 == sorted(at_4096, reverse=True) and abs(at_4096[0] - 75.1) < 1
    at_1024 = [predicted_us(80, 1024, 1024 * 640, 132, p) for p in (1, 2, 4)]
    assert at_1024[0] < min(at_1024[1:])


def test_no_pass_on_the_cpu():
    assert attention_split_options(torch.device("cpu")) == {}


class SelfAttention(torch.nn.Module):
    """q, k, v from one fused projection, as the pipeline's UNet lays them out."""

    def __init__(self, channels=64, heads=2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, torch.nn.Linear(channels, 3 * channels), torch.nn.Linear(channels, channels)

    def forward(self, x):
        rows, tokens, channels = x.shape
        q, k, v = self.qkv(x).view(rows, tokens, 3, self.heads, -1).unbind(2)
        attended = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.out(attended.transpose(1, 2).reshape(rows, tokens, channels))


@pytest.mark.parametrize("parts, gain", [(2, 1), (4, 1), (4, 40)])
def test_split_through_inductor_is_the_attention(parts, gain):
    torch.manual_seed(0)
    module = SelfAttention().eval()
    # one key set with a dominant key in the last part: the parts' weights must carry its mass;
    # at a gain of 40 the log-sum-exps reach hundreds, past what exp() holds in float32
    x = torch.randn(1, 256, 64) * gain
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
    assert (got - expected).abs().max().item() < 1e-5 * expected.abs().max().item()


def _attention_graph(rows=1, tokens=512, heads=2, width=32, masked=False):
    """The ATen graph of one attention (as the pass sees it) on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    def attend(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask if masked else None)

    with FakeTensorMode():
        args = [torch.empty(rows, heads, tokens, width) for _ in range(3)] + [torch.zeros(tokens, tokens)]
        return make_fx(attend, tracing_mode="real")(*args).graph


def _batches(graph):
    return [n.args[0].meta["val"].shape[0] for n in graph.nodes
            if n.target is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default]


def test_the_pass_counts_tiles():
    graph = _attention_graph(tokens=4096, heads=5, width=64)  # SD2.1's 64x64 level
    assert split_attention_keys(graph, 132) == 1
    assert _batches(graph) == [4]  # the parts in the batch dimension of one call
    graph = _attention_graph(tokens=1024, heads=10, width=64)  # its 32x32 level: one round
    assert split_attention_keys(graph, 132) == 0
    assert _batches(graph) == [1]
    graph = _attention_graph(tokens=4096, heads=5, width=40)  # 160 tiles, but heads the model was not fitted to
    assert split_attention_keys(graph, 132) == 0


def test_rows_above_one_are_left_whole():
    graph = _attention_graph(rows=2, tokens=4096, heads=5, width=64)
    assert split_attention_keys(graph, 132, parts=2) == 0
    assert _batches(graph) == [2]


def test_a_masked_attention_is_left_whole():
    graph = _attention_graph(tokens=4096, heads=5, width=64, masked=True)
    assert _batches(graph) == [1]  # still the kernel the pass knows, with a mask
    assert split_attention_keys(graph, 132, parts=2) == 0
    assert _batches(graph) == [1]
