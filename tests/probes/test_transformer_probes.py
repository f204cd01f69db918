"""The transformer pack on a tiny GPT-2 (transformers, random weights from ``GPT2Config``) and on
``nn.TransformerEncoder``: attention entropy collapse and logit growth named at the attention
module, massive activations at the block, logit divergence, gradient-norm spikes, no false alarm
on healthy training, and attention outputs bitwise unchanged."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import introspect
from introspect.probes.transformer import mha_stats, sdpa_stats
from tests.support.events import read_events

transformers = pytest.importorskip("transformers")

KINDS = {
    "attention_entropy_collapse",
    "attention_logit_growth",
    "massive_activation",
    "logit_divergence",
    "grad_norm_spike",
}
VOCAB, SEQ, BATCH = 50, 16, 4


def gpt2() -> nn.Module:
    # initializer_range 0.05: at GPT-2's default 0.02 a fresh model's attention logits are ~0.05,
    # and even ×900 (q and k ×30) leaves them ~45, unlike those of a trained model.
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=VOCAB,
        n_positions=SEQ,
        initializer_range=0.05,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


class Encoder(nn.Module):
    """Token embedding, ``nn.TransformerEncoder`` (``nn.MultiheadAttention`` inside), vocabulary head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)))


MODELS = {
    "gpt2": (gpt2, "transformer.h.1.attn", "transformer.h.1"),
    "encoder": (Encoder, "encoder.layers.1.self_attn", "encoder.layers.1"),
}


def scale_qk(model: nn.Module, factor: float) -> None:
    """Layer 1's query and key projection weights ×factor."""
    with torch.no_grad():
        if isinstance(model, Encoder):
            attn = model.encoder.layers[1].self_attn
            attn.in_proj_weight[: 2 * attn.embed_dim] *= factor
        else:
            c_attn = model.transformer.h[1].attn.c_attn  # Conv1D: (in, 3 * out), q then k then v
            c_attn.weight[:, : 2 * model.config.n_embd] *= factor


def block(model: nn.Module) -> nn.Module:
    return model.encoder.layers[1] if isinstance(model, Encoder) else model.transformer.h[1]


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    logits = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))


def train(model, logdir, steps, *, every=5, lr=1e-3, on_step=None, **options):
    torch.manual_seed(1)
    data = [torch.randint(0, VOCAB, (BATCH, SEQ)) for _ in range(8)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    with introspect.watch(model, logdir, every=every, optimizer=opt, summary=False, graph=False, **options) as w:
        for step in range(steps):
            if on_step is not None:
                on_step(step, model, opt)
            loss_of(model, data[step % len(data)]).backward()
            opt.step()
            opt.zero_grad()
    return w


def found(w, kinds=KINDS):
    return [a for a in w.alerts if a.kind in kinds]


@pytest.mark.parametrize("name", list(MODELS))
def test_scaled_query_key_names_the_attention_module(name, tmp_path):
    make, attn, _ = MODELS[name]
    torch.manual_seed(0)
    w = train(make(), tmp_path, 12, on_step=lambda step, m, o: step == 6 and scale_qk(m, 30.0))
    alerts = found(w, {"attention_entropy_collapse", "attention_logit_growth"})
    assert alerts, w.report()
    assert {a.where for a in alerts} == {attn}
    assert {a.step for a in alerts} == {10}  # the first logging step after the change
    assert "attention" in w.report() and attn in w.report()
    acc = read_events(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert f"attention/entropy/{attn}" in tags and f"attention/max_logit/{attn}" in tags
    growth = [e.value for e in acc.Scalars(f"attention/max_logit/{attn}")]
    assert growth[-1] > 100 * max(growth[:-1])


ATTENTION_MODULES = {
    "gpt2": ["transformer.h.0.attn", "transformer.h.1.attn"],
    "encoder": ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn"],
}


@pytest.mark.parametrize("name", list(MODELS))
def test_per_head_histograms_match_the_mean_scalars(name, tmp_path):
    """``attention/{entropy,max_logit}_heads/{module}``: one value per head at each logging step,
    whose mean is the scalar beside it, read back from the event file."""
    make, _, _ = MODELS[name]
    torch.manual_seed(0)
    train(make(), tmp_path, 11)
    acc = read_events(tmp_path)
    histograms = set(acc.Tags()["histograms"])
    for module in ATTENTION_MODULES[name]:
        for stat in ("entropy", "max_logit"):
            heads = acc.Histograms(f"attention/{stat}_heads/{module}")
            means = {e.step: e.value for e in acc.Scalars(f"attention/{stat}/{module}")}
            assert [e.step for e in heads] == sorted(means) == [0, 5, 10]
            for event in heads:
                h = event.histogram_value
                assert h.num == 2  # both models have two heads
                assert h.min < h.max  # two different heads, not the mean twice
                assert h.sum / h.num == pytest.approx(means[event.step], rel=1e-5, abs=1e-6)
        assert f"attention/entropy_heads/{module}" in histograms


def test_thresholds_move_the_attention_findings(tmp_path):
    torch.manual_seed(0)
    w = train(
        Encoder(),
        tmp_path,
        12,
        on_step=lambda step, m, o: step == 6 and scale_qk(m, 30.0),
        thresholds={"attention_max_logit": 1e9, "attention_entropy_floor": 0.0},
    )
    assert not found(w)


@pytest.mark.parametrize("name", list(MODELS))
def test_massive_activation_at_the_block(name, tmp_path):
    make, _, block_name = MODELS[name]
    torch.manual_seed(0)
    model = make()

    def add(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden + F.one_hot(torch.tensor(3), hidden.shape[-1]).to(hidden) * 5000.0
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    block(model).register_forward_hook(add)
    w = train(model, tmp_path, 6)
    alerts = found(w, {"massive_activation"})
    assert [(a.where, a.step) for a in alerts] == [(block_name, 0)], w.report()
    assert alerts[0].numbers["max_abs"] > 4000


@pytest.mark.parametrize("name", list(MODELS))
def test_learning_rate_jump_gives_a_gradient_norm_spike(name, tmp_path):
    make, _, _ = MODELS[name]
    torch.manual_seed(0)
    k = 30

    def jump(step, model, opt):
        if step == k:
            for group in opt.param_groups:
                group["lr"] *= 1000

    w = train(make(), tmp_path, k + 4, every=10, on_step=jump)
    spikes = found(w, {"grad_norm_spike"})
    assert spikes and k < spikes[0].step <= k + 3, w.report()
    assert spikes[0].numbers["sigma_above"] >= 7
    text = read_events(tmp_path).Tensors("diagnostics/pre_spike/text_summary")
    assert text and b"attention/entropy/" in text[0].tensor_proto.string_val[0]


def test_logit_divergence_at_the_output(tmp_path):
    torch.manual_seed(0)
    model = gpt2()
    with torch.no_grad():
        model.transformer.ln_f.weight *= 1000
    w = train(model, tmp_path, 1)
    alerts = found(w, {"logit_divergence"})
    assert len(alerts) == 1 and alerts[0].numbers["log_z_mean"] > math.log(VOCAB) + 50, w.report()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_healthy_training_raises_none_of_these(name, tmp_path):
    make, _, _ = MODELS[name]
    torch.manual_seed(0)
    w = train(make(), tmp_path, 300)
    assert not found(w), w.report()


@pytest.mark.parametrize("name", list(MODELS))
def test_attention_outputs_are_bitwise_unchanged(name, tmp_path):
    make, attn, _ = MODELS[name]
    torch.manual_seed(0)
    model = make()  # GPT-2 keeps its dropout: the probe draws no random numbers
    x = torch.randint(0, VOCAB, (BATCH, SEQ))
    module = dict(model.named_modules())[attn]
    seen: list[torch.Tensor] = []
    modes: list[int] = []
    module.register_forward_hook(lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).detach().clone()))
    module.register_forward_hook(lambda m, a, o: modes.append(torch._C._len_torch_function_stack()))

    def outputs(watched: bool) -> list[torch.Tensor]:
        seen.clear()
        torch.manual_seed(5)
        if watched:
            with introspect.watch(model, tmp_path, every=2, summary=False, graph=False) as w:
                for _ in range(3):
                    loss_of(model, x).backward()
            assert w.alerts == []
        else:
            for _ in range(3):
                loss_of(model, x).backward()
        return list(seen)

    plain = outputs(False)
    modes.clear()
    watched = outputs(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, watched)) and len(watched) == 3
    assert [m > 0 for m in modes] == [True, False, True]  # the mode only on logging steps 0 and 2


@pytest.fixture
def softmax_inputs(monkeypatch) -> list[torch.Tensor]:
    """What ``F.softmax`` is given from now on: inside ``F.multi_head_attention_forward``, the
    scores (logits, -inf where masked). A mode would not see them: calls nested in its handler
    are not dispatched to modes."""
    seen: list[torch.Tensor] = []
    real = F.softmax

    def softmax(input, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(input.detach().clone())
        return real(input, *args, **kwargs)

    monkeypatch.setattr(F, "softmax", softmax)
    return seen


def mha_call(mha: nn.MultiheadAttention, x: torch.Tensor, **kwargs):
    """``mha(x, x, x, **kwargs)``: the ``F.multi_head_attention_forward`` call it makes and its
    per-head attention weights."""
    calls = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.multi_head_attention_forward:
                calls.append((args, kwargs or {}))
            return func(*args, **(kwargs or {}))

    with Spy():
        _, weights = mha(x, x, x, average_attn_weights=False, **kwargs)
    return calls[0], weights


def without_appended_keys(mha: nn.MultiheadAttention) -> nn.MultiheadAttention:
    """The same projections, no ``bias_k``/``bias_v`` and no zero row."""
    plain = nn.MultiheadAttention(mha.embed_dim, mha.num_heads, batch_first=mha.batch_first)
    plain.load_state_dict({k: v for k, v in mha.state_dict().items() if k not in ("bias_k", "bias_v")})
    return plain


def test_stats_match_the_attention_weights():
    """``mha_stats`` against ``nn.MultiheadAttention(need_weights=True)``'s own weights, and
    ``sdpa_stats`` with a causal flag and with a boolean mask against a direct softmax."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(3, 10, 16)
    padding = torch.zeros(3, 10, dtype=torch.bool)
    padding[0, 7:] = True
    call, weights = mha_call(mha, x, key_padding_mask=padding, need_weights=True)
    max_logit, entropy, _ = mha_stats(*call)
    expected = torch.special.entr(weights).sum(-1).mean(dim=(0, 2))
    assert torch.allclose(entropy, expected, atol=1e-5)

    q, k = torch.randn(2, 3, 12, 8), torch.randn(2, 3, 12, 8)
    logits = q @ k.transpose(-2, -1) / math.sqrt(8)
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    for kwargs, mask in (({"is_causal": True}, causal), ({"attn_mask": causal}, causal)):
        max_logit, entropy, normalised = sdpa_stats((q, k, k), kwargs)
        masked = logits.masked_fill(~mask, float("-inf"))
        assert torch.allclose(max_logit, masked.amax(dim=(0, 2, 3)))
        assert torch.allclose(entropy, torch.special.entr(masked.softmax(-1)).sum(-1).mean(dim=(0, 2)), atol=1e-6)
        # Normalised per query by log of the keys it sees (i + 1 under the causal mask); query 0
        # sees one key, a distribution with no entropy to lose, and is left out.
        per_row = torch.special.entr(masked.softmax(-1)).sum(-1) / torch.arange(1, 13).clamp_min(2).log()
        assert torch.allclose(normalised, per_row[..., 1:].mean(dim=(0, 2)), atol=1e-6)
        assert bool(((normalised > 0) & (normalised <= 1)).all())


@pytest.mark.parametrize("bias_kv, zero_attn", [(True, False), (False, True), (True, True)])
def test_mha_appended_keys_match_the_attention_weights(bias_kv, zero_attn, softmax_inputs):
    """``add_bias_kv`` and ``add_zero_attn`` append keys that every query attends to: the max
    logit and entropy count them, as torch's softmax does, under a causal and a padding mask."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True, add_bias_kv=bias_kv, add_zero_attn=zero_attn)
    if bias_kv:  # large enough to be the max logit of some rows
        nn.init.normal_(mha.bias_k, std=3.0)
    x = torch.randn(3, 10, 16)
    padding = torch.zeros(3, 10, dtype=torch.bool)
    padding[0, 7:] = True
    causal = torch.ones(10, 10, dtype=torch.bool).triu(1)  # True: masked
    call, weights = mha_call(mha, x, attn_mask=causal, key_padding_mask=padding, need_weights=True)
    keys = 10 + bias_kv + zero_attn
    assert weights.shape[-1] == keys
    max_logit, entropy, _ = mha_stats(*call)
    scores = softmax_inputs[-1].view(3, 4, 10, keys)
    assert torch.allclose(max_logit, scores.amax(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(entropy, torch.special.entr(weights).sum(-1).mean(dim=(0, 2)), atol=1e-5)
    # Without the appended keys the numbers differ: the test sees them.
    plain = mha_call(without_appended_keys(mha), x, attn_mask=causal, key_padding_mask=padding)[0]
    assert not torch.allclose(entropy, mha_stats(*plain)[1], atol=1e-3)


def test_mha_causal_fast_path_hides_the_appended_keys(softmax_inputs):
    """``is_causal=True`` without a padding mask and ``need_weights=False``: torch drops the mask
    and runs SDPA's top-left causal over all keys, so no query sees the appended ones; the stats
    are those of the same weights without them."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True, add_bias_kv=True, add_zero_attn=True)
    nn.init.normal_(mha.bias_k, std=3.0)
    x = torch.randn(3, 10, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(10)
    fast, _ = mha_call(mha, x, attn_mask=causal, is_causal=True, need_weights=False)
    _, weights = mha_call(without_appended_keys(mha), x, attn_mask=causal, need_weights=True)
    max_logit, entropy, _ = mha_stats(*fast)
    assert torch.allclose(max_logit, softmax_inputs[-1].view(3, 4, 10, 10).amax(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(entropy, torch.special.entr(weights).sum(-1).mean(dim=(0, 2)), atol=1e-5)


def test_mha_static_key_replaces_the_projection(softmax_inputs):
    """``F.multi_head_attention_forward(static_k=...)`` attends over the given keys (and the zero
    row of ``add_zero_attn``)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4)
    x, static = torch.randn(10, 3, 16), torch.randn(3 * 4, 7, 4) * 3
    args = (
        x,
        x,
        x,
        16,
        4,
        mha.in_proj_weight,
        mha.in_proj_bias,
        None,
        None,
        True,
        0.0,
        mha.out_proj.weight,
        mha.out_proj.bias,
    )
    kwargs = dict(static_k=static, static_v=static, need_weights=True, average_attn_weights=False)
    _, weights = F.multi_head_attention_forward(*args, **kwargs)
    max_logit, entropy, _ = mha_stats(args, kwargs)
    assert weights.shape[-1] == 8
    assert torch.allclose(max_logit, softmax_inputs[-1].view(3, 4, 10, 8).amax(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(entropy, torch.special.entr(weights).sum(-1).mean(dim=(0, 2)), atol=1e-5)


def test_gradient_norm_rides_in_the_checks_one_transfer(tmp_path, monkeypatch):
    """Off the logging cadence a checked step still makes exactly one host transfer, and the norm
    the spike score reads is the global gradient norm."""
    import introspect.records.step as step_module
    from introspect.probes.grad_spike import GradNormSpike

    transfers: list[int] = []
    real = step_module.one_transfer
    monkeypatch.setattr(step_module, "one_transfer", lambda parts: transfers.append(len(parts)) or real(parts))
    real_array = step_module.transfer_array  # a logging step's end: its records as one host array
    monkeypatch.setattr(step_module, "transfer_array", lambda parts: transfers.append(len(parts)) or real_array(parts))
    torch.manual_seed(0)
    model = Encoder()
    x = torch.randint(0, VOCAB, (BATCH, SEQ))
    norms = []
    with introspect.watch(model, tmp_path, every=10**9, summary=False, graph=False) as w:
        for _ in range(6):
            loss_of(model, x).backward()
            norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
            model.zero_grad()
            transfers.append(-1)  # a step boundary
        spike = next(p for p in w.probes if isinstance(p, GradNormSpike))
        steps: list[list[int]] = [[]]
        for n in transfers[:-1]:
            if n == -1:
                steps.append([])
            else:
                steps[-1].append(n)
    # One transfer per step, at its backward; step 1's forward also ends logging step 0 (its records).
    assert [len(g) for g in steps] == [1, 2, 1, 1, 1, 1], transfers
    assert list(spike._window) == pytest.approx(norms, rel=1e-5)
