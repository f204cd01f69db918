"""Attention in every implementation: Hugging Face's ``eager`` attention gives the numbers its
``sdpa`` attention gives on the same weights, a ×30 query/key fault is named on the eager model,
timm's non-fused attention and a hand-written ``softmax(q @ kᵀ / √d)`` are seen, a module that
looks like attention but computes it in a way no path reads is said once, and under
``torch.compile`` the attention is read from an eager rerun of the logging step."""

from __future__ import annotations

import copy
import math
import shutil
import warnings

import pytest
import torch
from torch import nn

from introspect import IntrospectWarning, watch
from introspect.probes.transformer import looks_like_attention
from introspect.runtime.selection import root_name
from tests.support import QUIET
from tests.support.events import read_events
from tests.support.hf_models import tiny_decoder

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 64, 12


def llama(impl: str, seed: int = 0) -> nn.Module:
    """Two Llama layers, grouped-query attention (4 query heads, 2 key/value heads). Weights at
    0.1 (not 0.02): a fresh model's logits ~1, so ×30 on q and k lifts them above 100."""
    return tiny_decoder("llama", impl, seed, initializer_range=0.1)


def batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # left padding: a mask beside the causal one
        out.append(dict(input_ids=ids, attention_mask=mask, labels=ids))
    return out


def attention_scalars(logdir) -> dict[tuple[str, int], float]:  # type: ignore[no-untyped-def]
    acc = read_events(logdir)
    return {
        (tag, e.step): e.value
        for tag in acc.Tags()["scalars"]
        if tag.startswith("attention/")
        for e in acc.Scalars(tag)
    }


def train_llama(model, logdir, steps, every=1, on_step=None, lr=1e-3):  # type: ignore[no-untyped-def]
    """lr=0: the weights stay as they are (eager and sdpa compared on the same weights: one
    optimizer step apart, float rounding grows through AdamW's first, sign-like update)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IntrospectWarning)  # no "attention not seen" here
        with watch(model, logdir, every=every, optimizer=opt, **QUIET) as w:
            for step, batch in enumerate(batches(steps)):
                if on_step is not None:
                    on_step(step, model)
                model(**batch).loss.backward()
                opt.step()
                opt.zero_grad()
    return w


def test_eager_attention_equals_sdpa_on_the_same_weights(tmp_path):
    sdpa, eager = llama("sdpa"), llama("eager")
    eager.load_state_dict(sdpa.state_dict())
    assert sdpa.config._attn_implementation == "sdpa" and eager.config._attn_implementation == "eager"
    train_llama(sdpa, tmp_path / "sdpa", 3, lr=0.0)  # three batches on the same weights
    train_llama(eager, tmp_path / "eager", 3, lr=0.0)
    a, b = attention_scalars(tmp_path / "sdpa"), attention_scalars(tmp_path / "eager")
    expected = {f"attention/{stat}/model.layers.{i}.self_attn" for stat in ("entropy", "max_logit") for i in range(2)}
    assert {tag for tag, _ in a} == expected
    assert a.keys() == b.keys() and len(a) == 4 * 3
    for key in a:
        assert abs(a[key] - b[key]) <= 1e-4, (key, a[key], b[key])


def scale_qk(model: nn.Module, factor: float) -> None:
    with torch.no_grad():
        attn = model.model.layers[1].self_attn
        attn.q_proj.weight *= factor
        attn.k_proj.weight *= factor


def test_query_key_fault_is_named_on_the_eager_model(tmp_path):
    w = train_llama(llama("eager"), tmp_path, 8, every=2, on_step=lambda step, m: step == 3 and scale_qk(m, 30.0))
    alerts = [a for a in w.alerts if a.kind.startswith("attention_")]
    assert alerts, w.report()
    assert {a.where for a in alerts} == {"model.layers.1.self_attn"}
    assert {a.step for a in alerts} == {4}  # the first logging step after the change
    assert "attention_logit_growth" in {a.kind for a in alerts}


class HandWritten(nn.Module):
    """softmax(q @ kᵀ / √d) over a causal mask of -inf, one head, (B, L, S) scores."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        return self.proj(torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1) @ v)


class Pool(nn.Module):
    """A softmax over the last dimension of a 3-D tensor outside any attention module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.softmax(dim=-1) * x).sum(1)


class Tiny(nn.Module):
    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.embed, self.attn, self.pool, self.head = nn.Linear(4, 16), attention, Pool(), nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.attn(self.embed(x))))


def test_hand_written_attention_is_seen(tmp_path):
    torch.manual_seed(0)
    model = Tiny(HandWritten())
    x = torch.randn(3, 10, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", IntrospectWarning)
        with watch(model, tmp_path, every=1, **QUIET) as w:
            model(x).sum().backward()
    assert not [a for a in w.alerts if a.kind.startswith("attention")]
    got = attention_scalars(tmp_path)
    assert {tag for tag, _ in got} == {"attention/entropy/attn", "attention/max_logit/attn"}  # not pool
    with torch.no_grad():  # the same numbers by hand, over the causal positions only
        q, k, _ = model.attn.qkv(model.embed(x)).chunk(3, dim=-1)
        scores = q @ k.transpose(-2, -1) / 4.0
        allowed = torch.ones(10, 10, dtype=torch.bool).tril()
        p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean()
        top = scores.masked_fill(~allowed, float("-inf")).amax()
    assert got[("attention/entropy/attn", 0)] == pytest.approx(entropy.item(), abs=1e-5)
    assert got[("attention/max_logit/attn", 0)] == pytest.approx(top.item(), abs=1e-5)


def test_timm_non_fused_attention_equals_fused(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    fused = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=3
    )
    eager = copy.deepcopy(fused)
    for module in eager.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    assert any(getattr(m, "fused_attn", None) is True for m in fused.modules())
    x = torch.randn(2, 3, 16, 16)
    for name, model in (("fused", fused), ("eager", eager)):
        with watch(model, tmp_path / name, every=1, **QUIET) as w:
            model(x).sum().backward()
        assert not [a for a in w.alerts if a.kind == "attention_not_seen"]
    a, b = attention_scalars(tmp_path / "fused"), attention_scalars(tmp_path / "eager")
    assert {tag for tag, _ in a} == {f"attention/{s}/blocks.{i}.attn" for s in ("entropy", "max_logit") for i in (0, 1)}
    assert a.keys() == b.keys()
    for key in a:
        assert abs(a[key] - b[key]) <= 1e-4, (key, a[key], b[key])


class OddAttention(nn.Module):
    """Attention by a softmax written out by hand (exp over its sum): no path recognises it."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q_proj(x) @ self.k_proj(x).transpose(-2, -1) / 4.0
        e = (scores - scores.amax(-1, keepdim=True)).exp()
        return (e / e.sum(-1, keepdim=True)) @ self.v_proj(x)


def test_attention_not_seen_is_said_once(tmp_path):
    torch.manual_seed(0)
    model = Tiny(OddAttention())
    assert looks_like_attention(model.attn) and not looks_like_attention(model.pool)
    with pytest.warns(IntrospectWarning, match="attn look like attention but made no attention call") as caught:
        with watch(model, tmp_path, every=1, **QUIET) as w:
            for _ in range(3):
                model(torch.randn(3, 10, 4)).sum().backward()
    assert len([c for c in caught if "look like attention" in str(c.message)]) == 1
    [alert] = [a for a in w.alerts if a.kind == "attention_not_seen"]
    assert (alert.where, alert.step, alert.module_type) == ("attn", 0, "OddAttention")
    assert "attention_not_seen" in w.report()
    assert not [t for t, _ in attention_scalars(tmp_path)]


def test_a_gate_called_attention_is_not_attention():
    class ChannelAttention(nn.Module):  # CBAM's: a sigmoid gate over channels, no keys
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

    assert not looks_like_attention(ChannelAttention())
    assert looks_like_attention(nn.MultiheadAttention(8, 2))


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile on CPU needs a C++ compiler"
)
def test_compiled_model_attention_comes_from_an_eager_rerun(tmp_path):
    """No function mode may enter a compiled graph: the logging step's forward runs again eagerly
    (no gradients, the real forward's inputs and RNG state). Its numbers are the eager watch's,
    and training stays bitwise the unwatched compiled twin's (GPT-2 keeps its dropout)."""
    import torch._dynamo

    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=SEQ, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config)
    data = [b["input_ids"] for b in batches(4)]

    def run(model, logdir, compiled, watched):  # type: ignore[no-untyped-def]
        torch._dynamo.reset()
        torch.manual_seed(3)
        forward = torch.compile(model) if compiled else model
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w = watch(forward, logdir, every=2, optimizer=opt, **QUIET) if watched else None
            for ids in data:
                loss = forward(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.detach())
            if w is not None:
                w.close()
        return losses

    eager_losses = run(copy.deepcopy(base), tmp_path / "eager", False, True)
    compiled_losses = run(copy.deepcopy(base), tmp_path / "compiled", True, True)
    twin_losses = run(copy.deepcopy(base), None, True, False)
    assert all(torch.equal(a, b) for a, b in zip(compiled_losses, twin_losses))
    a, b = attention_scalars(tmp_path / "eager"), attention_scalars(tmp_path / "compiled")
    assert {step for _, step in b} == {0, 2} and a.keys() == b.keys() and len(a) == 2 * 2 * 2
    for key in [k for k in a if k[1] == 0]:
        # Step 0: the same weights, and the rerun draws the eager run's dropout masks from the
        # RNG state the compiled forward started in. (Later steps differ: inductor draws its own.)
        assert abs(a[key] - b[key]) <= 1e-4, (key, a[key], b[key])
    assert len(eager_losses) == 4


@pytest.mark.slow
def test_compiled_forward_that_changes_its_inputs_is_not_run_again(tmp_path):
    """A forward that changes its input in place (here: halves it) would change the caller's
    tensor once more in the eager rerun: no rerun then, one warning, and the input, the losses
    and the weights stay bitwise the unwatched twin's."""
    import torch._dynamo

    class Halving(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.attn, self.head = nn.Linear(4, 16), HandWritten(), nn.Linear(16, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.mul_(0.5)
            return self.head(self.attn(self.embed(x))).mean()

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Halving()
    twin = copy.deepcopy(model)
    run, run_twin = torch.compile(model, backend="aot_eager"), torch.compile(twin, backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(2, SEQ, 4, generator=g) for _ in range(3)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", IntrospectWarning)
        with watch(run, tmp_path, every=1, **QUIET):
            for x in data:
                mine, theirs = x.clone(), x.clone()
                loss, twin_loss = run(mine), run_twin(theirs)
                loss.backward()
                twin_loss.backward()
                assert torch.equal(loss, twin_loss) and torch.equal(mine, theirs)
    assert len([c for c in caught if "changes its inputs in place" in str(c.message)]) == 1
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    torch._dynamo.reset()


class _Block(nn.Module):
    """An attention module and an MLP beside it, as in a transformer block."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.mlp(x)


def _attention_mode_on() -> bool:
    from introspect.probes.transformer import _AttentionMode

    return any(isinstance(m, _AttentionMode) for m in torch.overrides._get_current_function_mode_stack())


@pytest.mark.parametrize("root_is_attention", [False, True], ids=["in_a_block", "the_root"])
def test_the_function_mode_is_on_only_while_attention_runs(tmp_path, root_is_attention):
    """The mode's Python call per torch function lands on the attention modules alone: the MLP
    beside them runs without it, the attention is read all the same, and the mode is gone after
    each forward; a watched root that is itself the attention has it for its whole forward."""
    torch.manual_seed(0)
    model: nn.Module = nn.MultiheadAttention(16, 2, batch_first=True) if root_is_attention else _Block()
    seen: dict[str, list[bool]] = {"mlp": [], "attn": []}
    if not root_is_attention:
        model.mlp.register_forward_pre_hook(lambda m, a: seen["mlp"].append(_attention_mode_on()))
        model.attn.register_forward_hook(lambda m, a, o: seen["attn"].append(_attention_mode_on()))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x = torch.randn(2, 5, 16)
    with watch(model, tmp_path, every=2, **QUIET):
        for _ in range(4):
            out = model(x, x, x)[0] if root_is_attention else model(x)
            assert not _attention_mode_on()
            out.pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    tags = [t for t in read_events(tmp_path).Tags()["scalars"] if t.startswith("attention/entropy/")]
    assert tags == [f"attention/entropy/{root_name(model)}" if root_is_attention else "attention/entropy/attn"]
    steps = [e.step for e in read_events(tmp_path).Scalars(tags[0])]
    assert steps == [0, 2]
    if not root_is_attention:
        assert seen["mlp"] == [False] * 4  # (logging steps or not)
        assert seen["attn"] == [True, False, True, False]  # on logging steps only
