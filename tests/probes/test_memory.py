"""Per-module memory of a training step: saved-for-backward bytes against an independent count and
an analytic one, ``watch(..., log=[..., "memory"])``'s scalars and table, ``introspect memory``, and
the out-of-memory post-mortem."""

from __future__ import annotations

import copy
import math
import traceback
import warnings
import weakref
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from introspect import IntrospectWarning, watch
from introspect._torch import saved_tensors_hooks_in_use
from introspect.analysis.memory import (
    OPTIMIZERS,
    OUTSIDE,
    fit_line,
    is_out_of_memory,
    measure_step_memory,
    memory_growth,
    parse_byte_size,
    step_inputs,
)
from introspect.cli.commands import main
from introspect.errors import ConfigError
from tests.support.events import read_events, text_of
from tests.support.hooks import count_hooks, hook_state
from tests.support.training import assert_same_losses, assert_same_state
from tests.support.zoo import SeedCNN

transformers = pytest.importorskip("transformers")

from tests.support.hf_models import tiny_gpt2, token_ids  # noqa: E402  (after the skip: it imports transformers)


# --------------------------------------------------------------------------- the independent count
class _Box:
    """What the test's own pack hook returns: the tensor detached, and a weak reference to follow
    when autograd lets go of it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor.detach()


class IndependentTally:
    """Saved-for-backward bytes of one forward and backward, by the innermost running module, counted
    here in the test: its own saved_tensors_hooks, its own module stack, storages deduplicated by
    data pointer, parameters and buffers left out, the live total followed with weakref.finalize."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.exclude = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self.stack = ["<outside>"]
        self.bytes: dict[str, int] = defaultdict(int)
        self.refs: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def _drop(self, ptr: int, nbytes: int) -> None:
        self.refs[ptr] -= 1
        if self.refs[ptr] == 0:
            del self.refs[ptr]
            self.live -= nbytes

    def pack(self, tensor: torch.Tensor) -> _Box:
        box = _Box(tensor)
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in self.exclude:
            if ptr not in self.refs:
                self.refs[ptr] = 0
                self.bytes[self.stack[-1]] += storage.nbytes()
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            self.refs[ptr] += 1
            weakref.finalize(box, self._drop, ptr, storage.nbytes())
        return box

    def run(self, *inputs: Any) -> None:
        """One forward in training mode and the backward of the output's (first floating) sum."""

        def enter(name: str) -> Any:
            def hook(module: nn.Module, args: Any) -> None:
                self.stack.append(name)

            return hook

        def leave(module: nn.Module, args: Any, output: Any) -> None:
            self.stack.pop()

        handles = []
        for name, module in self.model.named_modules():
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave, always_call=True))
        self.model.train()
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda box: box.tensor):
                out = self.model(*inputs)
            first = out if isinstance(out, torch.Tensor) else out[0]
            first.sum().backward()
        finally:
            for h in handles:
                h.remove()
        self.model.zero_grad(set_to_none=True)

    def with_children(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for name, nbytes in self.bytes.items():
            if name == "<outside>":
                continue
            out[""] += nbytes
            parts = name.split(".") if name else []
            for i in range(1, len(parts) + 1):
                out[".".join(parts[:i])] += nbytes
        return dict(out)


def own_names(step: Any) -> dict[str, int]:
    """A StepMemory's saved bytes keyed as the test's tally keys them (the root as "")."""
    root = step.modules[0]
    return {("" if name == root else name): b for name, b in step.saved.items()}


# --------------------------------------------------------------------------- the models
def tiny_llama() -> nn.Module:
    """A Llama-style decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU."""
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


def transformer_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


MODELS = {
    "cnn": (SeedCNN, lambda: torch.randn(4, 3, 32, 32)),
    "transformer_encoder": (transformer_encoder, lambda: torch.randn(2, 16, 32)),
    "gpt2": (tiny_gpt2, lambda: token_ids(2)),
    "llama": (tiny_llama, lambda: token_ids(2)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_saved_bytes_per_module_equal_an_independent_count(name):
    build, make_input = MODELS[name]
    torch.manual_seed(0)
    model = build()
    x = make_input()
    independent = IndependentTally(copy.deepcopy(model))
    independent.run(x)
    step = measure_step_memory(model, (x,), optimizer="adam")
    assert own_names(step) == {k: v for k, v in independent.bytes.items() if v}
    assert step.peak_saved == independent.peak
    # The per-module bytes add up to the step's peak of live saved tensors (nothing is let go
    # during a forward), within 5%.
    assert math.isclose(step.saved_bytes, step.peak_saved, rel_tol=0.05)
    assert step.saved_bytes > 0 and step.param_bytes > 0
    assert step.grad_bytes == sum(p.numel() * 4 for p in model.parameters())
    assert step.optimizer_bytes >= 2 * step.grad_bytes  # Adam: exp_avg, exp_avg_sq (and a step count)
    assert all(p.grad is None for p in model.parameters())  # nothing of the model changed


def mlp(batch: int, sizes: tuple[int, ...] = (10, 32, 32, 1)) -> tuple[nn.Module, torch.Tensor]:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
    return nn.Sequential(*layers[:-1]), torch.randn(batch, sizes[0])


def test_a_plain_mlp_saves_what_the_analytic_count_says():
    """Each Linear keeps its input for its weight's gradient; each ReLU its output (the mask of
    where it let the gradient through). A ReLU's output is the next Linear's input: one storage,
    charged once, to the ReLU. The first input needs no gradient, so the first weight is not kept;
    the later weights are, and are not activations."""
    torch.manual_seed(0)
    batch = 8
    model, x = mlp(batch, (10, 32, 48, 1))
    step = measure_step_memory(model, (x,))
    floats = 4
    assert step.saved == {"0": batch * 10 * floats, "1": batch * 32 * floats, "3": batch * 48 * floats}
    assert step.peak_saved == step.saved_bytes
    assert step.peak_module == "3"
    params = sum(p.numel() * floats for p in model.parameters())
    assert step.predicted_peak == 2 * params + step.optimizer_bytes + step.saved_bytes


def test_views_and_tensors_shared_between_modules_are_counted_once():
    class Split(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)  # three views of one output
            return q * k * v

    class Reader(nn.Module):
        def forward(self, x):
            return x.exp()

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.split = Split()
            self.a = nn.Sigmoid()
            self.b = Reader()

        def forward(self, x):
            h = self.split(x)
            return self.a(h) + self.b(h) * h  # h is read (and saved) by b and by the product

    torch.manual_seed(0)
    x = torch.randn(4, 8)
    step = measure_step_memory(Shared(), (x,), optimizer="none")
    qkv = 4 * 24 * 4
    row = 4 * 8 * 4
    # q * k keeps q and k, two views of the qkv output: its storage once; (q * k) * v keeps the
    # product (new) and v (a third view: nothing more).
    assert step.saved["split"] == qkv + row
    assert step.saved["split.qkv"] == row  # the input x
    assert step.saved["a"] == row  # sigmoid's output
    assert step.saved["b"] == row  # exp's output
    # The root's product b(h) * h keeps exp's output (b's already) and h, saved here first.
    assert step.saved["model"] == row
    assert step.saved_bytes == step.peak_saved == qkv + 5 * row


def test_measuring_changes_nothing_of_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 1)).eval()
    x = torch.randn(16, 6)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = copy.deepcopy(model)
    rng = torch.get_rng_state()
    for optimizer in OPTIMIZERS:
        measure_step_memory(model, (x,), optimizer=optimizer)
    assert_same_state(model, before)  # weights (lr=0 steps) and BatchNorm's running stats
    assert not model.training and not any(m.training for m in model.modules())
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    assert not saved_tensors_hooks_in_use()


def test_optimizer_state_bytes_per_kind():
    torch.manual_seed(0)
    model, x = mlp(4)
    params = sum(p.numel() * 4 for p in model.parameters())
    sizes = {kind: measure_step_memory(model, (x,), optimizer=kind).optimizer_bytes for kind in OPTIMIZERS}
    assert sizes["none"] == 0
    assert sizes["sgd"] == params  # one momentum buffer
    assert sizes["adam"] == sizes["adamw"] >= 2 * params
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        measure_step_memory(model, (x,), optimizer="lion")


# --------------------------------------------------------------------------- under watch
def test_watch_writes_saved_bytes_per_module_and_the_table(tmp_path, capsys):
    torch.manual_seed(0)
    model = tiny_gpt2()
    independent = IndependentTally(copy.deepcopy(model))
    batches = [token_ids(2, seed=i) for i in range(3)]
    independent.run(batches[0])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with watch(model, tmp_path, every=2, log=["memory"], optimizer=opt, graph=False) as w:
        for ids in batches:
            loss = model(ids).logits.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    printed = capsys.readouterr().out
    acc = read_events(tmp_path)
    expected = independent.with_children()
    scalars = {t for t in acc.Tags()["scalars"] if t.startswith("memory/saved/")}
    assert scalars == {f"memory/saved/{m}" for m in w.module_names if m in expected}
    for tag in scalars:
        module = tag.removeprefix("memory/saved/")
        assert [e.step for e in acc.Scalars(tag)] == [0, 2]  # logging steps only
        assert acc.Scalars(tag)[0].value == pytest.approx(expected[module], rel=1e-6), module
    assert acc.Scalars("memory/saved_peak")[0].value == pytest.approx(independent.peak, rel=1e-6)
    (table,) = text_of(acc, "model/memory")  # step 2's peak is step 0's: written once
    assert [e.step for e in acc.Tensors("model/memory/text_summary")] == [0]
    assert "Memory of training step 0 (measured)" in table and "optimizer state" in table
    assert "Largest holders: transformer.h" in table
    assert printed.count("Memory of training step 0 (measured)") == 1  # with the summary, once
    probe = next(p for p in w.probes if p.name == "memory")
    assert probe.last.step == 2 and probe.last.optimizer_bytes > 0 and probe.last.grad_bytes > 0


def test_off_the_measured_steps_there_is_no_hook_and_training_is_unchanged(tmp_path):
    """The saved-tensor hooks and the per-module stack hooks exist on logging steps only; losses and
    weights are bitwise those of an unwatched run; a saved tensor changed in place still fails
    backward as autograd makes it fail without the hooks."""
    seen: list[tuple[int, bool, int]] = []

    class Spy(nn.Module):
        def forward(self, x):
            ours = [h for h in self._forward_hooks.values() if "SavedTally" in h.__qualname__]
            seen.append((len(seen), saved_tensors_hooks_in_use(), len(ours)))
            return x

    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.2), Spy(), nn.Tanh(), nn.Linear(16, 1))

    def run(model: nn.Module) -> list[torch.Tensor]:
        torch.manual_seed(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        losses = []
        for _ in range(5):
            loss = F.mse_loss(model(torch.randn(8, 6)), torch.randn(8, 1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        return losses

    bare = build()
    bare_losses = run(bare)
    seen.clear()
    watched = build()
    with watch(watched, tmp_path, every=3, log=["memory"], summary=False, graph=False):
        watched_losses = run(watched)
    assert_same_losses(bare_losses, watched_losses)
    assert_same_state(bare, watched)
    hooked = {i for i, in_use, _ in seen if in_use}
    assert hooked == {0, 3}  # the logging steps
    assert {i for i, _, stack_hooks in seen if stack_hooks} == {0, 3}  # the module-stack hook too
    assert not saved_tensors_hooks_in_use()

    class InPlaceAfterSave(nn.Module):
        def forward(self, x):
            return torch.sigmoid(x)  # sigmoid keeps its output

    for measuring in (False, True):
        model = nn.Sequential(nn.Linear(3, 3), InPlaceAfterSave())
        log = ["memory"] if measuring else ["activations"]
        with watch(model, tmp_path / f"inplace{measuring}", log=log, summary=False, graph=False):
            out = model(torch.randn(2, 3))
            out.mul_(2)  # the bug: changes what backward needs
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                out.sum().backward()


def test_someone_elses_saved_tensor_hooks_are_left_alone(tmp_path):
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with watch(model, tmp_path, log=["memory"], summary=False, graph=False) as w:
            for _ in range(2):
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    loss = model(torch.randn(5, 4)).sum()
                loss.backward()
    assert len(packed) >= 2 * 3  # the user's hooks saw every saved tensor, on both steps
    messages = [str(r.message) for r in record if issubclass(r.category, IntrospectWarning)]
    assert len(messages) == 1 and "saved-tensor hooks of another tool" in messages[0]
    assert not any(t.startswith("memory/") for t in read_events(tmp_path).Tags()["scalars"])
    assert w.alerts == []


# --------------------------------------------------------------------------- out of memory
class Boom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.error: BaseException | None = None

    def forward(self, x):
        if self.error is not None:
            raise self.error
        return x


class OomNet(nn.Module):
    """``act`` holds the most (its 256-wide output is saved); ``boom`` raises when armed."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(16, 256)
        self.act = nn.ReLU()
        self.small = nn.Linear(256, 4)
        self.boom = Boom()

    def forward(self, x):
        return self.boom(self.small(self.act(self.big(x))))


def _train_until_oom(
    model: OomNet, logdir: Path, error: BaseException, at_step: int, **options: Any
) -> tuple[Any, BaseException]:
    opt = torch.optim.Adam(model.parameters())
    caught = None
    with watch(model, logdir, optimizer=opt, summary=False, graph=False, **options) as w:
        for step in range(at_step + 1):
            if step == at_step:
                model.boom.error = error
            try:
                loss = model(torch.randn(32, 16)).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
            except BaseException as e:  # noqa: BLE001 - the test looks at exactly what came out
                caught = e
    assert caught is not None
    return w, caught


def _user_frames(error: BaseException) -> list[tuple[str, str]]:
    torch_dir = str(Path(torch.__file__).parent)
    return [(f.filename, f.name) for f in traceback.extract_tb(error.__traceback__) if torch_dir not in f.filename]


def test_an_oom_reaches_the_user_unchanged_and_the_report_names_what_held_the_memory(tmp_path):
    torch.manual_seed(0)
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    w, caught = _train_until_oom(OomNet(), tmp_path, error, at_step=0, log=["memory"], every=1)
    assert caught is error and type(caught) is torch.OutOfMemoryError
    assert str(caught) == "CUDA out of memory. Tried to allocate 20.00 GiB"
    assert caught.__cause__ is None and caught.__context__ is None and not getattr(caught, "__notes__", None)
    assert traceback.extract_tb(caught.__traceback__)[-1].name == "forward"  # Boom.forward's raise
    # The same user frames as without watch.
    torch.manual_seed(0)
    bare = OomNet()
    bare.boom.error = torch.OutOfMemoryError("x")
    with pytest.raises(torch.OutOfMemoryError) as bare_error:
        bare(torch.randn(32, 16))
    assert _user_frames(caught)[-2:] == _user_frames(bare_error.value)[-2:]  # OomNet.forward, Boom.forward

    (alert,) = w.alerts
    assert (alert.kind, alert.where, alert.step, alert.phase) == ("out_of_memory", "boom", 0, "forward")
    assert alert.message.startswith("torch.OutOfMemoryError in the forward of boom at step 0")
    assert "so far in this step" in alert.message and "(largest: act 32 KiB" in alert.message
    assert alert.numbers["saved_bytes"] == 32 * 16 * 4 + 32 * 256 * 4  # big's input, act's output
    assert alert.numbers["param_bytes"] == sum(p.numel() * 4 for p in OomNet().parameters())
    assert "optimizer state 0 B" in alert.message  # Adam's state comes with its first step
    report = w.report()
    assert "out_of_memory (forward)" in report and "largest: act" in report
    (text,) = text_of(read_events(tmp_path), "diagnostics/alerts")
    assert "out_of_memory" in text and "largest: act" in text


def test_an_oom_off_the_measured_steps_reports_the_last_measured_step(tmp_path):
    torch.manual_seed(0)
    error = MemoryError("cannot allocate")
    w, caught = _train_until_oom(OomNet(), tmp_path, error, at_step=2, log=["memory"], every=10)
    assert caught is error
    (alert,) = w.alerts
    assert alert.where == "boom" and alert.step == 2
    assert "at step 0, the last measured step" in alert.message and "(largest: act 32 KiB" in alert.message
    assert alert.numbers["measured_step"] == 0
    assert alert.numbers["optimizer_bytes"] > alert.numbers["param_bytes"]  # Adam's two buffers by now
    # The previous step's gradients are still held: this loop's zero_grad() comes after the forward.
    assert alert.numbers["grad_bytes"] == alert.numbers["param_bytes"]


def test_an_oom_without_memory_measured_and_other_errors(tmp_path):
    torch.manual_seed(0)
    error = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes")
    w, caught = _train_until_oom(OomNet(), tmp_path / "a", error, at_step=1)
    assert caught is error
    (alert,) = w.alerts
    assert "saved activations not measured" in alert.message
    w, caught = _train_until_oom(OomNet(), tmp_path / "b", ValueError("not memory"), at_step=1)
    assert w.alerts == [] and isinstance(caught, ValueError)
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


class _OomInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise torch.OutOfMemoryError("out of memory in backward")


def test_an_oom_that_leaves_the_with_block_from_backward(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 4))
    before = count_hooks(hook_state(model))
    with pytest.raises(torch.OutOfMemoryError, match="out of memory in backward"):
        with watch(model, tmp_path, log=["memory"], summary=False, graph=False) as w:
            loss = _OomInBackward.apply(model(torch.randn(32, 16))).sum()
            loss.backward()
    (alert,) = w.alerts
    assert alert.phase == "" and "outside any module's forward" in alert.message
    assert alert.where == "1"  # the ReLU's output: the largest holder
    assert count_hooks(hook_state(model)) == before
    assert not saved_tensors_hooks_in_use()


# --------------------------------------------------------------------------- introspect memory
@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_cli_memory_on_a_hf_folder_with_batch_sizes_and_a_budget(llama_folder):
    result = CliRunner().invoke(
        main,
        ["memory", str(llama_folder), "--input-shape", "1,16", "--dtype", "int64", "--batch-size", "1,8,32"]
        + ["--budget", "24GB", "--optimizer", "adamw"],
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "one training step on an input of shape 32,16 (int64); backward of the model's own loss" in out
    for column in ("params+buffers", "grads", "optimizer state", "saved for backward"):
        assert column in out
    for module in ("model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"):
        assert f"  {module} " in out
    assert "Predicted peak:" in out and "Largest holders: model.layers." in out
    # The same steps through the library: the CLI prints its fit and the batch it allows.
    from introspect.load.models import load_model

    model = load_model(str(llama_folder))
    ids = {b: torch.randint(0, 100, (b, 16)) for b in (1, 8, 32)}
    growth = memory_growth(model, lambda b: step_inputs(model, ids[b]), [1, 8, 32], optimizer="adamw")
    peaks = [s.predicted_peak for s in growth.steps]
    assert peaks[0] < peaks[1] < peaks[2]
    assert all(abs(growth.predicted(b) - p) / p < 0.01 for b, p in zip((1, 8, 32), peaks))  # linear in the batch
    largest = growth.largest_batch(24 * 2**30)
    assert largest == math.floor((24 * 2**30 - growth.fixed) / growth.per_sample)
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("batch"))
    assert [line.split()[0] for line in lines[header + 1 : header + 4]] == ["1", "8", "32"]
    assert "Fit: peak = " in out and "x batch (least squares over batch sizes 1, 8, 32" in out
    assert f"Largest batch that fits 24 GiB: {largest:,}" in out


def test_cli_memory_rejects_bad_options(llama_folder):
    base = ["memory", str(llama_folder), "--input-shape", "1,4", "--dtype", "int64"]
    bad = CliRunner().invoke(main, [*base, "--batch-size", "0,2"])
    assert bad.exit_code == 2 and "positive integers" in bad.output
    bad = CliRunner().invoke(main, [*base, "--budget", "12XB"])
    assert bad.exit_code == 2 and "memory size" in bad.output
    one = CliRunner().invoke(main, [*base, "--budget", "1GB"])
    assert one.exit_code == 0 and "needs two or more batch sizes" in one.output


def test_byte_sizes_and_the_line():
    assert parse_byte_size("24GB") == parse_byte_size("24 GiB") == parse_byte_size("24g") == 24 * 2**30
    assert parse_byte_size("512MiB") == 512 * 2**20 and parse_byte_size("1.5e9") == 1_500_000_000
    for bad in ("", "GB", "-1GB", "12XB", "0"):
        with pytest.raises(ConfigError):
            parse_byte_size(bad)
    assert fit_line([1, 2, 4], [3, 5, 9]) == pytest.approx((1.0, 2.0))
    with pytest.raises(ConfigError):
        fit_line([2, 2], [1, 3])


def test_the_loss_outside_the_model_is_its_own_row():
    torch.manual_seed(0)
    model, x = mlp(4)
    step = measure_step_memory(model, (x,))
    assert OUTSIDE not in step.saved  # a sum saves nothing
    args, kwargs = step_inputs(model, x)
    assert kwargs == {} and args[0] is x


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_allocator_view_beside_the_count():
    torch.manual_seed(0)
    model = SeedCNN().cuda()
    step = measure_step_memory(model, (torch.randn(8, 3, 32, 32, device="cuda"),))
    assert step.cuda is not None and step.cuda.reserved >= step.cuda.allocated
    assert "CUDA:0" in step.table() and "CUDA alloc. delta" in step.table()
    assert step.cuda_delta["conv1"] > 0
