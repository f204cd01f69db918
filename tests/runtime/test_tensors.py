"""named_float_tensors: every floating tensor of a module's output, by a stable name."""

from __future__ import annotations

import warnings
from collections import OrderedDict, namedtuple

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from introspect.runtime.tensors import named_float_tensors


def names(output):
    return [name for name, _ in named_float_tensors(output)]


def test_plain_float_tensor():
    x = torch.randn(2, 3)
    found = named_float_tensors(x)
    assert len(found) == 1
    assert found[0][0] == ""
    assert found[0][1] is x


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_float_dtype(dtype):
    x = torch.zeros(3, dtype=dtype)
    assert named_float_tensors(x) == [("", x)]


def _quantized() -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized tensors are deprecated, not gone
        return torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.arange(4),
        lambda: torch.arange(4, dtype=torch.int8),
        lambda: torch.arange(4, dtype=torch.int32),
        lambda: torch.tensor([True, False]),
        lambda: torch.tensor([1 + 2j]),  # complex: not a histogram
        _quantized,
        lambda: torch.empty(3, device="meta"),
    ],
    ids=["int64", "int8", "int32", "bool", "complex", "quantized", "meta"],
)
def test_non_float_tensors_are_skipped(make):
    x = make()
    assert named_float_tensors(x) == []
    assert named_float_tensors((x, [x], {"k": x})) == []


@pytest.mark.parametrize("obj", [None, 3, 2.5, "text", object(), {"a": None}, (None, 1), []], ids=repr)
def test_non_tensors_are_skipped(obj):
    assert named_float_tensors(obj) == []


def test_tuple_keeps_indices_and_skips_non_float():
    a, b = torch.randn(2), torch.randn(3)
    found = named_float_tensors((a, torch.arange(3), None, b))
    assert [n for n, _ in found] == ["0", "3"]
    assert found[0][1] is a and found[1][1] is b


def test_list_output():
    a, b = torch.randn(2), torch.randn(3)
    assert names([a, b]) == ["0", "1"]


def test_nested_like_lstm():
    lstm = nn.LSTM(4, 5)
    out = lstm(torch.randn(3, 2, 4))
    found = named_float_tensors(out)
    assert [n for n, _ in found] == ["0", "1/0", "1/1"]
    assert found[0][1] is out[0]
    assert found[1][1] is out[1][0]
    assert found[2][1] is out[1][1]


def test_deeply_nested():
    x = torch.randn(1)
    assert names((x, [x, (x, {"k": x})])) == ["0", "1/0", "1/1/0", "1/1/1/k"]


def test_dict_uses_keys_in_order():
    d = OrderedDict(logits=torch.randn(2), mask=torch.ones(2, dtype=torch.bool), hidden=torch.randn(3))
    found = named_float_tensors(d)
    assert [n for n, _ in found] == ["logits", "hidden"]
    assert found[1][1] is d["hidden"]
    assert names({1: torch.randn(1), "b": torch.randn(1)}) == ["1", "b"]


def test_namedtuple_uses_field_names():
    Out = namedtuple("Out", ["logits", "labels", "hidden"])
    o = Out(torch.randn(2), torch.arange(2), (torch.randn(1), torch.randn(1)))
    assert names(o) == ["logits", "hidden/0", "hidden/1"]


def test_packed_sequence_contributes_its_data():
    seq = torch.randn(3, 2, 4)
    packed = pack_padded_sequence(seq, torch.tensor([3, 2]))
    found = named_float_tensors(packed)
    assert [n for n, _ in found] == [""]
    assert found[0][1] is packed.data
    # An LSTM on a packed sequence returns (PackedSequence, (h, c)).
    out = nn.LSTM(4, 5)(packed)
    found = named_float_tensors(out)
    assert [n for n, _ in found] == ["0", "1/0", "1/1"]
    assert found[0][1] is out[0].data


def test_attention_output_without_weights():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)
    out = mha(x, x, x, need_weights=False)
    assert names(out) == ["0"]
    out = mha(x, x, x)
    assert names(out) == ["0", "1"]


def test_very_deep_nesting_stops_quietly():
    x = torch.randn(1)
    obj = x
    for _ in range(50):
        obj = (obj,)
    assert named_float_tensors(obj) == []  # past the depth limit: skipped, not a RecursionError
    shallow = ((((x,),),),)
    assert names(shallow) == ["0/0/0/0"]


def test_self_referencing_container_does_not_recurse_forever():
    loop: list = [torch.randn(1)]
    loop.append(loop)
    found = named_float_tensors(loop)
    assert found[0][0] == "0"
