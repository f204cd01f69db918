"""The module-level graph: what the hooks of one extra forward record, the GraphDef it becomes,
and the graph that models ``torch.jit.trace`` cannot take get under ``watch``."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from introspect import IntrospectWarning, watch
from introspect.analysis import module_graph
from introspect.analysis.module_graph import (
    graph_def,
    record_module_graph,
    write_module_graph,
)
from tests.support.events import read_events
from tests.support.hooks import count_hooks, hook_state


def introspect_warnings(record) -> list[str]:
    return [str(r.message) for r in record if issubclass(r.category, IntrospectWarning)]


def module_graph_notes(capsys) -> list[str]:
    """The module-level graph notes printed on stderr (information, once per model class per process)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("introspect: note: module-level")]


def edges(graph) -> dict[str, list[str]]:
    """``{node: its inputs}`` of a GraphDef (or of an EventAccumulator's graph)."""
    return {n.name: list(n.input) for n in graph.node}


def shapes(graph) -> dict[str, list[list[int]]]:
    return {n.name: [[d.size for d in s.dim] for s in n.attr["_output_shapes"].list.shape] for n in graph.node}


class Residual(nn.Module):
    """x + fc2(act(fc1(x))): the sum is the block's own code, not a module."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class Net(nn.Module):
    """Two residual blocks and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = Residual()
        self.block2 = Residual()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block2(self.block1(x)))


# --------------------------------------------------------------------------- the record and the GraphDef
def test_nodes_are_nested_by_dotted_name_and_edges_follow_the_tensors():
    torch.manual_seed(0)
    graph, _ = graph_def(record_module_graph(Net(), (torch.randn(3, 4),)))
    b1, b2 = "Net/block1", "Net/block2"
    assert edges(graph) == {
        "input/0": [],
        f"{b1}/block1.forward": ["input/0", f"{b1}/block1.fc2"],  # the residual sum reads both
        f"{b1}/block1.fc1": ["input/0"],
        f"{b1}/block1.act": [f"{b1}/block1.fc1"],
        f"{b1}/block1.fc2": [f"{b1}/block1.act"],
        f"{b2}/block2.forward": [f"{b1}/block1.forward", f"{b2}/block2.fc2"],
        f"{b2}/block2.fc1": [f"{b1}/block1.forward"],
        f"{b2}/block2.act": [f"{b2}/block2.fc1"],
        f"{b2}/block2.fc2": [f"{b2}/block2.act"],
        "Net/head": [f"{b2}/block2.forward"],
        "output/0": ["Net/head"],
    }
    sizes = shapes(graph)
    assert sizes[f"{b1}/block1.fc1"] == [[3, 8]] and sizes["Net/head"] == [[3, 2]] and sizes["input/0"] == [[3, 4]]
    ops = {n.name: n.op for n in graph.node}
    assert ops[f"{b1}/block1.fc1"] == "Linear" and ops[f"{b1}/block1.forward"] == "Residual"
    attrs = {n.name: n.attr["attr"].s.decode() for n in graph.node if "attr" in n.attr}
    assert attrs[f"{b1}/block1.fc1"] == "in_features=4, out_features=8, bias=True"


def test_a_module_called_twice_gets_a_node_per_call():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(self.lin(x))

    graph, _ = graph_def(record_module_graph(Twice(), (torch.randn(2, 4),)))
    assert edges(graph) == {
        "input/0": [],
        "Twice/lin": ["input/0"],
        "Twice/lin#2": ["Twice/lin"],
        "output/0": ["Twice/lin#2"],
    }


def test_several_outputs_and_keyword_inputs_are_numbered_edges():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(4, 6, batch_first=True)
            self.fc = nn.Linear(6, 2)

        def forward(self, x, *, scale):
            out, (h, c) = self.lstm(x)
            return {"logits": self.fc(h[-1]) * scale, "cell": c}

    record = record_module_graph(TwoHeads(), (torch.randn(3, 5, 4),), {"scale": torch.tensor(2.0)})
    graph, _ = graph_def(record)
    assert [name for name, _, _ in record.inputs] == ["0", "scale"]
    assert shapes(graph)["TwoHeads/lstm"] == [[3, 5, 6], [1, 3, 6], [1, 3, 6]]
    links = edges(graph)
    assert links["output/cell"] == ["TwoHeads/lstm:2"]
    assert links["TwoHeads/fc"] == ["TwoHeads/TwoHeads.forward"]  # h[-1] is the root's own code
    # The root's own code reads its inputs, h (for h[-1]) and fc's output (times scale); the
    # unused sequence output counts as read by it too (an output no module read went back into it).
    assert links["TwoHeads/TwoHeads.forward"] == [
        "input/0",
        "input/scale",
        "TwoHeads/lstm",
        "TwoHeads/lstm:1",
        "TwoHeads/fc",
    ]
    assert links["output/logits"] == ["TwoHeads/TwoHeads.forward:1"]


def test_recording_puts_training_state_back_and_removes_its_hooks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    model[1].eval()  # a frozen BatchNorm stays frozen
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = count_hooks(hook_state(model))
    x = torch.randn(6, 4, requires_grad=True)
    rng = torch.get_rng_state()
    record_module_graph(model, (x,))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model] == [True, False, True, True] and model.training
    assert count_hooks(hook_state(model)) == hooks
    assert x.grad is None and all(p.grad is None for p in model.parameters())


def test_the_models_own_error_passes_through_and_no_hook_is_left():
    class Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            raise ValueError("the model's own words")

    model = Fails()
    hooks = count_hooks(hook_state(model))
    with pytest.raises(ValueError, match="the model's own words"):
        record_module_graph(model, (torch.randn(2, 4),))
    assert count_hooks(hook_state(model)) == hooks


def test_calls_past_the_limit_are_left_out_and_said(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(module_graph, "MAX_CALLS", 3)
    torch.manual_seed(0)
    record = record_module_graph(Net(), (torch.randn(3, 4),))
    assert record.truncated and [c.name for c in record.calls] == ["", "block1", "block1.fc1"]
    graph, _ = graph_def(record)
    assert "Net/block1/block1.fc1" in edges(graph)
    from introspect.analysis.summary import write_graph

    class Untraceable(Net):
        def forward(self, x):
            return {"out": super().forward(x), "note": "not a tensor"}

    with SummaryWriter(str(tmp_path)) as writer, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert write_graph(writer, Untraceable(), (torch.randn(3, 4),)) is True
    assert introspect_warnings(caught) == []  # a note, not a warning
    notes = module_graph_notes(capsys)
    assert len(notes) == 1 and "module-level graph written (the first 3 module calls)" in notes[0], notes


def test_a_writer_without_a_file_writer_is_a_type_error():
    class NoFileWriter:
        pass

    with pytest.raises(TypeError, match="NoFileWriter has no file writer"):
        write_module_graph(NoFileWriter(), Net(), (torch.randn(3, 4),))


# --------------------------------------------------------------------------- under watch
def test_gpt2_under_watch_gets_a_module_graph_and_trains_as_without(tmp_path, capsys):
    from tests.support.hf_models import VOCAB, tiny_gpt2

    def losses(watched: bool) -> list[float]:
        torch.manual_seed(0)
        model = tiny_gpt2().train()  # dropout on: the extra forward must not move the RNG
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        out = []
        with watch(model, tmp_path / "run", every=1, summary=False) if watched else _nothing():
            for _ in range(2):
                x = torch.randint(0, VOCAB, (2, 8))
                loss = model(input_ids=x, labels=x).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                out.append(loss.item())
        return out

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched = losses(True)
    assert watched == losses(False)
    assert introspect_warnings(caught) == []  # the module-level graph is a note, not a warning
    found = module_graph_notes(capsys)
    assert len(found) == 1 and found[0].startswith("introspect: note: module-level graph written"), found
    assert "tracing GPT2LMHeadModel failed" in found[0]
    graph = read_events(tmp_path / "run").Graph()
    names = [n.name for n in graph.node]
    assert [n for n in names if "transformer.h.0" in n], names
    links, sizes = edges(graph), shapes(graph)
    attn = "GPT2LMHeadModel/transformer/transformer.h/transformer.h.0/transformer.h.0.attn"
    assert links[f"{attn}/transformer.h.0.attn.c_proj"] == [f"{attn}/transformer.h.0.attn.forward"]
    assert f"{attn}/transformer.h.0.attn.c_attn" in links[f"{attn}/transformer.h.0.attn.forward"]
    assert sizes[f"{attn}/transformer.h.0.attn.c_attn"] == [[2, 8, 96]]
    assert links["output/logits"] == ["GPT2LMHeadModel/lm_head"]


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.mark.slow
def test_faster_rcnn_under_watch_gets_a_module_graph(tmp_path, capsys):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=3,
        min_size=64,
        max_size=64,
        rpn_pre_nms_top_n_train=20,
        rpn_post_nms_top_n_train=10,
        box_batch_size_per_image=16,
        rpn_batch_size_per_image=16,
    ).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 40.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with watch(model, tmp_path / "run", every=1, summary=False):
            loss = sum(model(images, targets).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert [w for w in introspect_warnings(caught) if "graph" in w] == []
    found = module_graph_notes(capsys)
    assert len(found) == 1 and "module-level graph written" in found[0] and "tracing FasterRCNN failed" in found[0]
    graph = read_events(tmp_path / "run").Graph()
    names = [n.name for n in graph.node]
    assert {"input/0/0", "input/0/1", "input/1/0/boxes"} <= set(names)
    for module in (
        "backbone.body.0.0",
        "rpn.head.cls_logits",
        "roi_heads.box_head.fc6",
        "roi_heads.box_predictor.cls_score",
    ):
        assert any(n.endswith("/" + module) for n in names), (module, names[:20])
    cls_score = next(n for n in graph.node if n.name.endswith("roi_heads.box_predictor.cls_score"))
    assert shapes(graph)[cls_score.name][0][-1] == 3  # one score per class
