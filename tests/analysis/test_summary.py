"""The torchinfo summary and the graph: written on the first training batch, without touching training."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import introspect
from introspect import IntrospectWarning, ModelTypeError, watch
from introspect.analysis.summary import model_summary, summary_markdown, write_graph
from introspect.runtime.preserved import preserved_state
from tests.support import QUIET
from tests.support.events import hist_at, read_events, text_of
from tests.support.training import train
from tests.support.zoo import SEED_CNN_PARAMS, PackedLSTM, SeedCNN, seed_cnn_batch, seed_cnn_loss

TOTAL = f"Total params: {SEED_CNN_PARAMS:,}"  # "Total params: 54,273"


def introspect_warnings(record) -> list[str]:
    return [str(r.message) for r in record if issubclass(r.category, IntrospectWarning)]


# --------------------------------------------------------------------------- through watch()
def test_summary_printed_on_first_batch_and_written(seed_cnn, writer, logdir, capsys):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with watch(seed_cnn, writer, every=1) as w:
            assert capsys.readouterr().out == ""  # nothing before the first batch
            x, y = seed_cnn_batch()
            out = seed_cnn(x)
            first = capsys.readouterr().out
            assert TOTAL in first
            assert "[2, 3, 32, 32]" in first  # from the real batch
            seed_cnn_loss(out, y).backward()
            train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 2)
            assert w.step == 2
    assert introspect_warnings(record) == []
    assert "Total params" not in capsys.readouterr().out  # printed once only
    acc = read_events(logdir)
    texts = text_of(acc, "model/summary")
    assert len(texts) == 1
    assert TOTAL in texts[0]
    assert [e.step for e in acc.Tensors("model/summary/text_summary")] == [0]
    assert acc.Tags()["graph"]
    graph = acc.Graph()
    node_names = " ".join(n.name for n in graph.node)
    for module in ("conv1", "conv2", "linear1", "linear2"):
        assert module in node_names
    # The extra forwards of summary and graph are not observed as training.
    assert hist_at(acc, "activations/conv1", 0).num == 2 * 32 * 30 * 30
    assert [e.step for e in acc.Histograms("activations/conv1")] == [0, 1, 2]


def test_summary_waits_for_a_training_batch(seed_cnn, writer, logdir, capsys):
    with watch(seed_cnn, writer, every=1, graph=False):
        seed_cnn.eval()
        seed_cnn(torch.randn(5, 3, 32, 32))
        with torch.no_grad():
            seed_cnn.train()
            seed_cnn(torch.randn(5, 3, 32, 32))
        assert capsys.readouterr().out == ""
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 1)
        out = capsys.readouterr().out
    assert TOTAL in out
    assert "[2, 3, 32, 32]" in out and "[5, 3, 32, 32]" not in out


def test_summary_and_graph_off(seed_cnn, writer, logdir, capsys):
    with watch(seed_cnn, writer, every=1, **QUIET):
        train(seed_cnn, seed_cnn_batch, seed_cnn_loss, 2)
    assert capsys.readouterr().out == ""
    acc = read_events(logdir)
    assert acc.Tags()["tensors"] == []
    assert not acc.Tags()["graph"]


class FrozenBNNet(nn.Module):
    """BatchNorm in training, one BatchNorm frozen in eval, dropout: all of which an extra forward
    in the wrong mode, with grad, or on the live RNG would change."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.frozen_bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = self.frozen_bn(torch.relu(self.bn(self.conv(x))))
        return self.fc(self.drop(x.mean((2, 3))))


def _frozen_bn_net() -> FrozenBNNet:
    torch.manual_seed(0)
    model = FrozenBNNet()
    with torch.no_grad():
        model.frozen_bn.running_mean.uniform_(-1, 1)
        model.frozen_bn.running_var.uniform_(0.5, 2)
    model.train()
    model.frozen_bn.eval()
    return model


def _first_steps(model, steps=2):
    torch.manual_seed(7)
    losses = train(model, lambda: (torch.randn(4, 3, 10, 10), torch.randint(0, 2, (4,))), F.cross_entropy, steps)
    return losses, [p.grad.clone() for p in model.parameters()], torch.get_rng_state()


@pytest.mark.parametrize(
    "summary, graph", [(True, False), (False, True), (True, True)], ids=["summary", "graph", "both"]
)
def test_first_batch_extras_do_not_change_state(tmp_path, capsys, summary, graph):
    bare = _frozen_bn_net()
    model = copy.deepcopy(bare)
    modes = {name: m.training for name, m in model.named_modules()}
    assert modes["frozen_bn"] is False and modes["bn"] is True

    bare_losses, bare_grads, bare_rng = _first_steps(bare)
    with watch(model, tmp_path / "run", every=1, summary=summary, graph=graph):
        losses, grads, rng = _first_steps(model)
        assert torch.is_grad_enabled()
        assert {name: m.training for name, m in model.named_modules()} == modes
    for a, b in zip(bare_losses, losses):
        assert torch.equal(a, b)
    for a, b in zip(bare_grads, grads):
        assert torch.equal(a, b)
    assert torch.equal(bare_rng, rng)
    for (name, a), b in zip(bare.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name  # running stats and num_batches_tracked
    assert {name: m.training for name, m in model.named_modules()} == modes
    acc = read_events(tmp_path / "run")
    assert bool(acc.Tags()["graph"]) == graph
    assert bool(text_of(acc, "model/summary") if summary else []) == summary


# --------------------------------------------------------------------------- graphs that cannot be traced
class StrOutput(nn.Module):
    """Returns a str next to its tensor: torchinfo copes, jit tracing does not."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x), "label"


class SetOutput(nn.Module):
    """Returns a Python set."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return {self.lin(x)}


class RefusesTracing(nn.Module):
    """Data-dependent Python control flow that refuses to be traced (as some libraries do)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        y = self.lin(x)
        if torch.jit.is_tracing():
            raise RuntimeError("this forward branches on data and cannot be traced")
        return y if float(y.sum()) > 0 else -y


class KeywordInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x, scale=1.0):
        return self.lin(x) * scale


def _first(out):
    if isinstance(out, tuple):
        return out[0]
    if isinstance(out, set):
        return next(iter(out))
    return out


@pytest.mark.parametrize(
    "model_cls, summary, call",
    [
        (StrOutput, True, lambda m, x: m(x)),
        (SetOutput, False, lambda m, x: m(x)),
        (RefusesTracing, True, lambda m, x: m(x)),
    ],
    ids=["str-output", "set-output", "refuses-tracing"],
)
def test_untraceable_model_gets_a_module_graph_one_note_and_training_goes_on(
    tmp_path, capsys, model_cls, summary, call
):
    torch.manual_seed(0)
    model = model_cls()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with watch(model, tmp_path / "run", every=1, summary=summary, graph=True) as w:
            for _ in range(3):
                loss = _first(call(model, torch.randn(3, 4))).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
    assert introspect_warnings(record) == []  # the graph was written: a note on stderr, not a warning
    printed = capsys.readouterr()
    found = [line for line in printed.err.splitlines() if "module-level graph" in line]
    assert len(found) == 1, found
    assert found[0].startswith("introspect: note: module-level graph written")
    assert f"tracing {model_cls.__name__} failed" in found[0]
    assert w.step == 2
    acc = read_events(tmp_path / "run")
    nodes = {n.name: n for n in acc.Graph().node}
    lin = nodes[f"{model_cls.__name__}/lin"]
    assert lin.op == "Linear" and list(lin.input) == ["input/0"]
    assert [d.size for d in lin.attr["_output_shapes"].list.shape[0].dim] == [3, 2]
    assert [e.step for e in acc.Histograms("grads/lin.weight")] == [0, 1, 2]
    if summary:
        assert "Total params: 10" in printed.out


def test_keyword_arguments_are_traced_through_a_wrapper_without_a_warning(tmp_path):
    torch.manual_seed(0)
    model = KeywordInput()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with watch(model, tmp_path / "run", every=1, summary=False) as w:
            model(torch.randn(3, 4), scale=torch.tensor(2.0)).sum().backward()
            model(torch.randn(3, 4), scale=3.0).sum().backward()
    assert introspect_warnings(record) == []
    assert w.step == 1
    nodes = read_events(tmp_path / "run").Graph().node
    # An operator graph (jit's aten:: nodes), rooted at the wrapper that took the keywords.
    assert any(n.name.startswith("KeywordCall/KeywordInput[model]/Linear[lin]") for n in nodes)
    assert "input/scale" in [n.name for n in nodes]
    assert "aten::mul" in [n.op for n in nodes]


def test_summary_failure_is_one_warning(tmp_path, capsys):
    torch.manual_seed(0)
    model = SetOutput()  # torchinfo cannot size a set
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with watch(model, tmp_path / "run", every=1, summary=True, graph=False) as w:
            for _ in range(2):
                next(iter(model(torch.randn(3, 4)))).sum().backward()
    found = introspect_warnings(record)
    assert len(found) == 1, found
    assert "summary" in found[0]
    assert w.step == 1
    assert text_of(read_events(tmp_path / "run"), "model/summary") == []


# --------------------------------------------------------------------------- the pieces
def test_model_summary_text():
    torch.manual_seed(0)
    text = model_summary(SeedCNN(), (torch.randn(2, 3, 32, 32),))
    assert TOTAL in text
    assert "Trainable params: 54,273" in text
    for layer in ("Conv2d", "MaxPool2d", "Dropout2d", "AdaptiveMaxPool2d", "Linear"):
        assert layer in text


def test_public_summary():
    torch.manual_seed(0)
    net = SeedCNN()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    text = introspect.summary(net, torch.randn(1, 3, 32, 32))
    assert TOTAL in text
    assert "[1, 3, 32, 32]" in text
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with pytest.raises(ModelTypeError) as info:
        introspect.summary("net", torch.randn(1, 3, 32, 32))
    assert "str" in str(info.value)


def test_summary_counts_frozen_parameters():
    torch.manual_seed(0)
    net = SeedCNN()
    net.conv2.requires_grad_(False)
    text = introspect.summary(net, torch.randn(1, 3, 32, 32))
    assert TOTAL in text
    assert "Non-trainable params: 51,264" in text


def test_summary_markdown_keeps_a_fixed_width_block():
    text = "Layer  Param #\nconv   896\n\nTotal params: 896"
    md = summary_markdown(text)
    assert md.splitlines() == ["    Layer  Param #", "    conv   896", "    ", "    Total params: 896"]


def test_preserved_state_restores_buffers_modes_and_rng():
    model = _frozen_bn_net()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    rng = torch.get_rng_state()
    with preserved_state(model):
        assert not torch.is_grad_enabled()
        model.train()
        model(torch.randn(4, 3, 10, 10))  # moves BN running stats, draws dropout masks
        torch.rand(10)
        assert not torch.equal(model.bn.running_mean, buffers["bn.running_mean"])
    assert torch.is_grad_enabled()
    assert torch.equal(torch.get_rng_state(), rng)
    assert {name: m.training for name, m in model.named_modules()} == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), k


def test_preserved_state_restores_after_an_error():
    model = _frozen_bn_net()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        with preserved_state(model):
            model.train()
            model(torch.randn(4, 3, 10, 10))
            raise ValueError
    assert model.frozen_bn.training is False
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), k


def test_write_graph(logdir, capsys):
    torch.manual_seed(0)
    writer = SummaryWriter(str(logdir))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert write_graph(writer, SeedCNN(), (torch.randn(1, 3, 32, 32),)) is True
        assert write_graph(writer, KeywordInput(), (torch.randn(1, 4),), {"scale": 2.0}) is True
        assert write_graph(writer, StrOutput(), (torch.randn(1, 4),)) is True
    writer.close()
    assert introspect_warnings(record) == []
    found = [line for line in capsys.readouterr().err.splitlines() if "module-level graph" in line]
    assert len(found) == 1 and "module-level graph written" in found[0] and "StrOutput" in found[0]
    assert read_events(logdir).Tags()["graph"]


class GraphlessWriter:
    """A writer whose add_graph always fails and that has no file writer for a GraphDef."""

    def add_graph(self, model, args, use_strict_trace=True):
        raise NotImplementedError("no graphs here")


def test_the_module_graph_note_is_printed_once_per_model_class(logdir, capsys):
    """Information, not a warning: a Hugging Face causal LM would repeat it on every run and every
    watch; once per model class per process says it once."""
    with warnings.catch_warnings(record=True) as record, SummaryWriter(str(logdir)) as writer:
        warnings.simplefilter("always")
        for _ in range(3):
            assert write_graph(writer, StrOutput(), (torch.randn(1, 4),)) is True
        for _ in range(2):
            assert write_graph(writer, RefusesTracing(), (torch.randn(1, 4),)) is True
    assert introspect_warnings(record) == []
    notes = [line for line in capsys.readouterr().err.splitlines() if "module-level graph" in line]
    assert len(notes) == 2, notes
    assert "tracing StrOutput failed" in notes[0] and "tracing RefusesTracing failed" in notes[1]


def test_write_graph_that_cannot_be_written_is_one_warning_and_false():
    model = StrOutput()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert write_graph(GraphlessWriter(), model, (torch.randn(1, 4),)) is False
    found = introspect_warnings(record)
    assert len(found) == 1
    assert found[0].startswith(
        "introspect: graph not written: tracing StrOutput failed (NotImplementedError: no graphs here)"
    )
    assert "GraphlessWriter has no file writer" in found[0]


# --------------------------------------------------------------------------- torchinfo's numbers put right
def test_a_tied_weight_is_counted_once():
    from tests.support.hf_models import tiny_gpt2, token_ids

    torch.manual_seed(0)
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    count = sum(p.numel() for p in model.parameters())
    text = introspect.summary(model, token_ids())
    assert f"Total params: {count:,}" in text and f"Trainable params: {count:,}" in text
    # torchinfo alone counts the head's copy too
    import torchinfo

    raw = torchinfo.summary(model, input_data=[token_ids()], verbose=0)
    assert raw.total_params == count + model.lm_head.weight.numel()


def test_mult_adds_are_labelled_torchinfos_estimate_without_an_enum_name():
    torch.manual_seed(0)
    text = model_summary(nn.Linear(4, 3), (torch.randn(2, 4),))
    # 2 samples x (4 x 3 weights + 3 biases); the counted FLOPs follow (tests/test_flops.py)
    assert "Total mult-adds (torchinfo's estimate; FLOPs counted below): 30" in text.splitlines()
    assert "Units." not in text


@pytest.mark.parametrize("root", ["lstm", "model"])
def test_a_packed_sequence_input_is_summarized(root):
    from torch.nn.utils.rnn import pack_padded_sequence

    torch.manual_seed(0)
    model = nn.LSTM(4, 6, batch_first=True) if root == "lstm" else PackedLSTM()
    packed = pack_padded_sequence(torch.randn(3, 5, 4), [5, 3, 2], batch_first=True)
    hooks = {name: len(m._forward_pre_hooks) for name, m in model.named_modules()}
    text = introspect.summary(model, packed)
    count = sum(p.numel() for p in model.parameters())
    assert f"Total params: {count:,}" in text
    assert "[10, 4]" in text  # the packed rows: 5 + 3 + 2 steps of 4 features
    assert {name: len(m._forward_pre_hooks) for name, m in model.named_modules()} == hooks


def test_what_torchinfo_cannot_size_is_a_clear_error_and_the_models_own_error_is_untouched():
    from introspect import IntrospectError

    with pytest.raises(
        IntrospectError,
        match=r"^torchinfo cannot summarize SetOutput on these inputs: TypeError: Model contains a layer with an unsupported",
    ):
        introspect.summary(SetOutput(), torch.randn(2, 4))

    class Raises(nn.Module):
        def forward(self, x):
            raise KeyError("the model's own")

    with pytest.raises(KeyError, match="the model's own"):
        introspect.summary(Raises(), torch.randn(2, 4))
