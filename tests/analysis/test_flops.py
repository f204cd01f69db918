"""True FLOPs per module (``torch.utils.flop_counter``) against the analytic counts, and in the summary."""

from __future__ import annotations

import contextlib
import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import introspect
from introspect import watch
from introspect.analysis.flops import count_flops
from introspect.analysis.summary import MULT_ADDS_LABEL
from tests.support import QUIET
from tests.support.training import assert_same_losses, assert_same_state

transformers = pytest.importorskip("transformers")

B, T = 2, 16  # a batch of 2 sequences of 16 tokens


def test_a_linear_on_tokens_is_2_b_t_in_out():
    lin = nn.Linear(24, 40)
    x = torch.randn(B, T, 24)
    flops = count_flops(lin, (x,))
    linear = 2 * B * T * 24 * 40
    assert flops.forward["model"] == flops.total_forward == linear
    assert flops.backward["model"] == linear  # the weight's gradient (the input needs none)
    x.requires_grad_(True)
    assert count_flops(lin, (x,)).total_backward == 2 * linear  # and the input's


def test_a_conv2d():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    flops = count_flops(nn.Sequential(conv), (torch.randn(B, 3, 20, 20),))
    per_output = 2 * 3 * 3 * 3  # in_channels x k x k multiply-adds
    assert flops.forward["0"] == B * 8 * 20 * 20 * per_output
    assert flops.backward["0"] == B * 8 * 20 * 20 * per_output


def attention_flops(d: int, heads_q: int, tokens: int) -> int:
    """Scores (q k^T) and their product with v: 2 x 2 x B x H x T x T x d_head."""
    d_head = d // heads_q
    return 2 * 2 * B * heads_q * tokens * tokens * d_head


def test_a_transformer_encoder_layer_with_tokens():
    d, ff, heads = 32, 64, 4
    layer = nn.TransformerEncoderLayer(d_model=d, nhead=heads, dim_feedforward=ff, batch_first=True)
    flops = count_flops(layer, (torch.randn(B, T, d),))
    linear = 2 * B * T
    in_proj = linear * d * 3 * d
    out_proj = linear * d * d
    assert flops.forward["self_attn"] == in_proj + attention_flops(d, heads, T) + out_proj
    assert flops.forward["linear1"] == linear * d * ff and flops.forward["linear2"] == linear * ff * d
    assert flops.total_forward == flops.forward["self_attn"] + linear * (d * ff + ff * d)


def tiny_llama(d: int = 32, ff: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 100):
    config = transformers.LlamaConfig(
        hidden_size=d,
        intermediate_size=ff,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


def llama_forward_flops(d=32, ff=64, layers=2, heads=4, kv_heads=2, vocab=100, tokens=T) -> int:
    linear = 2 * B * tokens
    kv = d // heads * kv_heads
    attention = linear * (d * d + 2 * d * kv + d * d) + attention_flops(d, heads, tokens)
    mlp = linear * 3 * d * ff  # gate, up, down
    return layers * (attention + mlp) + linear * d * vocab


def test_a_llama_style_decoder_with_grouped_query_attention():
    torch.manual_seed(0)
    model = tiny_llama()
    flops = count_flops(model, (torch.randint(0, 100, (B, T)),))
    assert flops.total_forward == llama_forward_flops()
    layer = (llama_forward_flops() - 2 * B * T * 32 * 100) // 2
    assert flops.forward["model.layers.0"] == flops.forward["model.layers.1"] == layer
    assert flops.forward["lm_head"] == 2 * B * T * 32 * 100
    # Backward: two matmuls per forward matmul (input and weight), but the first layer's q/k/v/gate/up
    # inputs come from the embedding, which needs a gradient too; attention's backward recomputes scores.
    assert flops.total_backward > 1.9 * flops.total_forward


def test_the_summary_total_is_no_longer_short_by_the_tokens(capsys):
    torch.manual_seed(0)
    model = tiny_llama()
    ids = torch.randint(0, 100, (B, T))
    text = introspect.summary(model, ids)
    mult_adds = int(re.search(re.escape(MULT_ADDS_LABEL) + r": ([\d,]+)", text).group(1).replace(",", ""))
    total = re.search(r"^Total\s+([\d,]+)\s+([\d,]+)$", text, re.MULTILINE)
    forward, backward = (int(g.replace(",", "")) for g in total.groups())
    assert forward == llama_forward_flops()
    assert backward > forward
    # torchinfo's estimate counts each Linear once per sequence, not per token: short by ~T.
    assert 2 * mult_adds * T / 2 < forward < 2 * mult_adds * T * 2
    assert "FLOPs of one forward and backward of this batch" in text
    for row in ("model.layers.0", "lm_head"):
        assert re.search(rf"^\s+{re.escape(row)}\s", text, re.MULTILINE)


class WithState(nn.Module):
    """BatchNorm's running statistics and dropout's RNG: what an extra forward could disturb."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(16, 1)

    def forward(self, x):
        return self.out(self.drop(self.bn(self.fc(x))))


def _train(model: nn.Module, logdir: Path | None) -> list[torch.Tensor]:
    torch.manual_seed(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    with watch(model, logdir, summary=True, graph=False) if logdir else contextlib.nullcontext():
        for _ in range(3):
            loss = F.mse_loss(model(torch.randn(8, 8)), torch.randn(8, 1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    return losses


def test_counting_changes_nothing_the_training_sees(tmp_path):
    torch.manual_seed(0)
    model = WithState()
    before = copy.deepcopy(model)
    x = torch.randn(8, 8)
    rng = torch.get_rng_state()
    count_flops(model, (x,))
    assert_same_state(model, before)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    twin = copy.deepcopy(model)
    assert_same_losses(_train(model, None), _train(twin, tmp_path))  # the summary's FLOP pass included
    assert_same_state(model, twin)


def test_a_frozen_model_counts_its_forward_only():
    model = nn.Linear(4, 4).requires_grad_(False)
    flops = count_flops(model, (torch.randn(B, T, 4),))
    assert not flops.backward_run and flops.total_backward == 0
    assert flops.total_forward == 2 * B * T * 4 * 4
    assert "-" in flops.table().splitlines()[-2]


def test_watch_prints_the_flops_with_the_summary(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    with watch(model, tmp_path, graph=False):
        model(torch.randn(4, 8)).sum().backward()
    out = capsys.readouterr().out
    assert re.search(rf"^Total\s+{2 * 4 * (8 * 16 + 16 * 2):,}\s", out, re.MULTILINE)
    with watch(model, tmp_path / "quiet", **QUIET):
        model(torch.randn(4, 8)).sum().backward()
    assert "FLOPs" not in capsys.readouterr().out
