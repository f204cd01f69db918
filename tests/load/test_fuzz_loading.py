"""Property: a mutated model file either reads or raises a LoadError, and never runs its payload.

Valid files of every format (a torch.save zip, the legacy torch.save format, TorchScript, a
torch.export program, safetensors) are mutated by hypothesis: member names (the prefixes torch
dispatches on, path escapes, case), JSON fields (the payload strings torch turns into code,
``use_pickle``, ``path_name``), pickle opcodes and whole pickles (a marker-writing payload),
layouts (the older flat .pt2 layout, duplicate and dropped members) and raw bytes. The payload only
writes a marker file in a temporary folder; after every example the marker must not exist.

The example count is bounded (``INTROSPECT_FUZZ_EXAMPLES``, 1000 by default: about 20 s on two
cores) and the run is derandomized, so CI sees the same examples every time; raise the count
locally to search further.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import pickle
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from introspect import LoadError
from introspect.load.models import read_model_file
from tests.support.saved_models import RunsCode, X, python_writing, quoteless, save_as, seed_cnn  # noqa: E402

EXAMPLES = int(os.environ.get("INTROSPECT_FUZZ_EXAMPLES", "1000"))
MARKER = Path(tempfile.mkdtemp(prefix="introspect-fuzz-")) / "marker.txt"
atexit.register(shutil.rmtree, MARKER.parent, True)  # module-level: hypothesis wants no function-scoped tmp_path
FORMATS = ("state_dict", "legacy", "torchscript", "export", "safetensors")


def _seeds() -> dict[str, bytes]:
    folder = MARKER.parent / "seeds"
    folder.mkdir(exist_ok=True)
    model = seed_cnn()
    files = {fmt: save_as(model, fmt, folder, X) for fmt in ("state_dict", "torchscript", "export", "safetensors")}
    legacy = folder / "legacy.pt"
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    files["legacy"] = legacy
    return {fmt: path.read_bytes() for fmt, path in files.items()}


SEEDS = _seeds()


def _payload_pickle(style: int) -> bytes:
    """A pickle (plain, or torch.save's zip) whose unpickling writes the marker."""
    if style == 0:
        return pickle.dumps(RunsCode(MARKER), protocol=2)
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(1), "x": RunsCode(MARKER)}, buffer)
    return buffer.getvalue()


NAME_TRICKS = [
    "opaque_obj_0",
    "opaque_obj_0/p",
    "custom_obj_0",
    "tensor_0",
    "weight_0",
    "../",
    "/",
    "data/aotinductor/",
    "MODEL",
    "Model.pt",
    "data.pkl",
    "constants.pkl",
    "version",
    "serialized_state_dict.pt",
    "extra/x",
    ".data/",
]
VALUE_TRICKS = [
    quoteless(python_writing(MARKER)),
    "x=" + python_writing(MARKER),
    f"__import__('os').system('touch {MARKER}')",
    "opaque_obj_0/p",
    "opaque_obj_0",
    "custom_obj_0",
    "../constants/tensor_0",
    "tensor_0",
    "weight_0",
    "",
    "a\rb",
    'torch.ops.aten.add.Tensor")',
    True,
    False,
    None,
    0,
    -1,
    2**40,
    1e308,
    [],
    {},
]
PICKLE_OPCODES = b"c\x93RbosNeu(]}.\x80\x8a\x8c"  # GLOBAL, STACK_GLOBAL, REDUCE, BUILD, ...

mutation = st.one_of(
    st.tuples(st.just("rename"), st.integers(0, 10**6), st.sampled_from(NAME_TRICKS), st.booleans()),
    st.tuples(st.just("pickle"), st.integers(0, 10**6), st.integers(0, 1)),
    st.tuples(st.just("json"), st.integers(0, 10**6), st.integers(0, 10**6), st.sampled_from(VALUE_TRICKS)),
    st.tuples(st.just("opcode"), st.integers(0, 10**6), st.integers(0, 10**6), st.sampled_from(list(PICKLE_OPCODES))),
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("layout"), st.sampled_from(["flat", "add_version", "duplicate", "drop"]), st.integers(0, 10**6)),
    st.tuples(st.just("truncate"), st.integers(1, 99)),
)


# --------------------------------------------------------------------------- mutating
def _members(data: bytes) -> list[tuple[str, bytes]] | None:
    if not data.startswith(b"PK"):
        return None
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return [(i.filename, z.read(i)) for i in z.infolist()]
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None


def _zipped(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are a mutation
        with zipfile.ZipFile(buffer, "w") as z:
            for name, data in members:
                z.writestr(name, data)
    return buffer.getvalue()


def _edit_json(data: bytes, where: int, value: object) -> bytes:
    """``data`` (JSON) with its ``where``-th string (a key or a value, in walk order) replaced."""
    try:
        document = json.loads(data)
    except ValueError:
        return data
    spots: list[tuple[object, object, bool]] = []  # (container, key, is_key)

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for k, v in list(node.items()):
                spots.append((node, k, True))
                if isinstance(v, (str, bool, int, float)) or v is None:
                    spots.append((node, k, False))
                walk(v)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                if isinstance(v, str):
                    spots.append((node, i, False))
                walk(v)

    walk(document)
    if not spots:
        return data
    container, key, is_key = spots[where % len(spots)]
    if is_key and isinstance(container, dict):
        container[str(value)] = container.pop(key)
    else:
        container[key] = value  # type: ignore[index]
    return json.dumps(document).encode()


def _flat_layout(members: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """The older flat .pt2 layout built from a current one (or any zip): parts renamed."""
    renames = {
        "models/model.json": "serialized_exported_program.json",
        "data/sample_inputs/model.pt": "serialized_example_inputs.pt",
    }
    flat = [("version", b"8.20")]
    for name, data in members:
        rel = name.split("/", 1)[-1]
        flat.append((renames.get(rel, rel), data))
    flat.append(("serialized_state_dict.pt", _payload_pickle(1)))
    flat.append(("serialized_constants.pt", _payload_pickle(0)))
    return flat


def mutate(data: bytes, steps: list[tuple]) -> bytes:
    for step in steps:
        kind, *args = step
        members = _members(data)
        if kind == "truncate":
            data = data[: max(1, len(data) * args[0] // 100)]
        elif kind == "flip":
            where, value = args[1], args[2]
            if members is not None and args[0] % 2:  # inside one member, rezipped (valid CRCs)
                i = args[0] % len(members)
                name, body = members[i]
                if body:
                    body = body[: where % len(body)] + bytes([value]) + body[where % len(body) + 1 :]
                members[i] = (name, body)
                data = _zipped(members)
            elif data:
                data = data[: where % len(data)] + bytes([value]) + data[where % len(data) + 1 :]
        elif members is None:  # raw formats: legacy pickle, safetensors
            if kind == "pickle":
                data = _payload_pickle(0)
            elif kind == "opcode" and data:
                data = data[: args[1] % len(data)] + bytes([args[2]]) + data[args[1] % len(data) + 1 :]
            elif kind == "json" and data[8:9] == b"{":  # the safetensors header
                size = int.from_bytes(data[:8], "little")
                header = _edit_json(data[8 : 8 + size], args[1], args[2])
                data = len(header).to_bytes(8, "little") + header + data[8 + size :]
        elif not members:
            continue
        elif kind == "rename":
            i = args[0] % len(members)
            name, body = members[i]
            root, _, rest = name.partition("/")
            tail = rest.rsplit("/", 1)[-1]
            new = f"{root}/{args[1]}{tail}" if args[2] else f"{root}/{rest.rsplit('/', 1)[0]}/{args[1]}"
            members[i] = (new, body)
            data = _zipped(members)
        elif kind == "pickle":
            pickles = [
                i
                for i, (n, _) in enumerate(members)
                if n.endswith((".pkl", ".pt")) or "/constants/" in n or "/weights/" in n
            ]
            if pickles:
                i = pickles[args[0] % len(pickles)]
                members[i] = (members[i][0], _payload_pickle(args[1]))
                data = _zipped(members)
        elif kind == "json":
            jsons = [i for i, (n, _) in enumerate(members) if n.endswith(".json")]
            if jsons:
                i = jsons[args[0] % len(jsons)]
                members[i] = (members[i][0], _edit_json(members[i][1], args[1], args[2]))
                data = _zipped(members)
        elif kind == "opcode":
            pickles = [i for i, (n, _) in enumerate(members) if n.endswith(".pkl") or n.endswith(".pt")]
            if pickles:
                i = pickles[args[0] % len(pickles)]
                name, body = members[i]
                if body:
                    body = body[: args[1] % len(body)] + bytes([args[2]]) + body[args[1] % len(body) + 1 :]
                members[i] = (name, body)
                data = _zipped(members)
        elif kind == "layout":
            how, i = args[0], args[1] % len(members)
            if how == "flat":
                members = _flat_layout(members)
            elif how == "add_version":
                members.append(("version", b"8.20"))
            elif how == "duplicate":
                members.append((members[i][0], _payload_pickle(1)))
            else:
                del members[i]
            data = _zipped(members)
    return data


# --------------------------------------------------------------------------- the property
@pytest.mark.slow
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(fmt=st.sampled_from(FORMATS), steps=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_files_never_run_code_and_fail_only_with_load_error(fmt, steps):
    data = mutate(SEEDS[fmt], steps)
    path = MARKER.parent / "mutated.bin"
    path.write_bytes(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            read_model_file(path)
        event(f"{fmt}: read")
    except LoadError as e:
        event(f"{fmt}: {type(e).__name__}")  # --hypothesis-show-statistics shows the mix
    finally:
        ran = MARKER.exists()
        MARKER.unlink(missing_ok=True)
    assert not ran, f"the payload ran: {fmt} after {steps}"


def test_the_fuzzer_can_build_files_that_run_code():
    """The property can fail: mutations the fuzzer draws do run their payload when read unsafely."""
    for fmt, steps in (
        ("state_dict", [("pickle", 0, 0)]),
        ("export", [("layout", "flat", 0)]),
        ("legacy", [("pickle", 0, 0)]),
    ):
        path = MARKER.parent / f"unsafe_{fmt}.bin"
        path.write_bytes(mutate(SEEDS[fmt], steps))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                read_model_file(path, unsafe=True)
        except LoadError:
            pass
        assert MARKER.exists(), fmt
        MARKER.unlink()
