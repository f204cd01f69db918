"""A TorchScript archive's weights, read without running the archive.

>>> state = torchscript_state_dict(Path("model.ts"))      # {"conv1.weight": tensor, ...}  # doctest: +SKIP

``torch.jit.load`` is not a reader: it compiles the TorchScript source the archive carries
(``code/**.py``, whatever its author wrote) and runs it, each object's ``__setstate__`` first.
TorchScript can call any operator, and ``torch.from_file(path, shared=True, size=n)`` maps any
file writable into memory: a ``copy_`` into it and loading the file has overwritten ``~/.bashrc``.
So without ``unsafe`` introspect never calls it, and reads the weights as data instead.

Besides its code, the archive holds ``data.pkl``, the module tree pickled (each module an object of
a class ``__torch__.<module path>.<Class>`` whose state is the dict of its attributes: submodules,
tensors, flags), and ``data/<n>``, the bytes of its tensors in the same storage records
``torch.save`` writes. ``data.pkl`` is read as ``torch.load(weights_only=True)`` reads a
checkpoint: through torch's own zip reader and its weights-only unpickler, with each ``__torch__``
class stood in for by an inert record (:class:`ScriptedObject`, which keeps the saved state and
runs nothing) and the identity helpers of ``torch.jit._pickle`` (``build_intlist``, ...) allowed.
Which attributes are parameters and buffers the code declares (``__parameters__ = ["weight",
"bias", ]``): each class's declarations are read with :mod:`ast`, which parses and never compiles.
A class that restores itself with its own ``__setstate__`` is refused: only its code knows what its
saved state means.
"""

from __future__ import annotations

import ast
import pickletools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._torch import torchscript_pickle_helpers, weights_only_unpickle, zip_reader
from ..errors import LoadError, UnsafeLoadError
from .archive import read_error, unsafe_message

__all__ = ["ScriptedObject", "torchscript_state_dict", "refuse_to_run"]

_PREFIX = "__torch__."
_MAX_STATE_ENTRIES = 10_000_000  # tensors and modules one archive may name; a real model has thousands


class ScriptedObject:
    """An object of a TorchScript class, as data: its class's name and the state it was saved with.

    A subclass per class name stands in for that class while ``data.pkl`` is unpickled; nothing
    of the archive's code is compiled or run.
    """

    qualified_name = ""

    def __setstate__(self, state: Any) -> None:
        self.saved_state = state


@dataclass(frozen=True)
class _Declared:
    """What a class's TorchScript source declares about it."""

    is_module: bool
    parameters: tuple[str, ...]
    buffers: tuple[str, ...]
    restores_itself: bool  # defines __setstate__


def torchscript_state_dict(path: Path, map_location: Any = "cpu") -> dict[str, torch.Tensor]:
    """The parameters and buffers of the TorchScript archive ``path``, named and ordered as
    ``torch.jit.load(path).state_dict()`` would, read without compiling or running its code.

    Raises:
        UnsafeLoadError: a class restores itself with its own code (``__setstate__``), or
            ``data.pkl`` holds objects only the archive's code can rebuild.
        LoadError: a corrupt archive, or declarations that do not parse.
    """
    try:
        reader = zip_reader(str(path))
        records = set(reader.get_all_records())
    except (RuntimeError, UnicodeDecodeError) as e:
        raise read_error(path, e) from e
    if "data.pkl" not in records:
        raise LoadError(f"cannot read {path}: a TorchScript archive without data.pkl")
    try:
        names = _globals_in(reader.get_record("data.pkl"))
    except (ValueError, RuntimeError, EOFError) as e:  # pickletools on a corrupt pickle
        raise LoadError(f"cannot read {path} (corrupt or truncated?): data.pkl: {e}") from e
    stand_ins = {name: _stand_in(name) for name in names if name.startswith(_PREFIX)}
    allowed: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
        (cls, name) for name, cls in stand_ins.items()
    ]
    allowed += torchscript_pickle_helpers()
    try:
        with torch.serialization.safe_globals(allowed):
            root = weights_only_unpickle(reader, map_location)
    except Exception as e:
        found = _unsupported_global(e)
        if found is not None:
            raise UnsafeLoadError(
                unsafe_message(
                    path,
                    f"objects beyond tensors and modules in its data.pkl ({found})",
                    "loading it with torch.jit.load",
                )
            ) from None
        raise read_error(path, e, part="data.pkl") from e
    declared = _Declarations(reader, records, path)
    return dict(_tensors(root, declared, path))


def refuse_to_run(path: Path) -> UnsafeLoadError:
    """The error for running a TorchScript archive's code without ``unsafe``: what the risk is, and
    the two ways on (its weights into ``--arch``, or ``--unsafe`` for a file you trust)."""
    return UnsafeLoadError(
        f"refusing to run {path}: it is a TorchScript archive, and loading it as a model runs the "
        "TorchScript code inside it, which can write any file your account can. Give the "
        "architecture its weights belong to with --arch package.module:Class (arch=...; its "
        "weights are read without running anything), or pass --unsafe (unsafe=True) if you trust "
        "the file"
    )


# --------------------------------------------------------------------------- data.pkl
def _globals_in(data: bytes) -> list[str]:
    """The ``module.name`` of every GLOBAL in a pickle, read by disassembling it (nothing runs)."""
    names = []
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name == "GLOBAL" and isinstance(arg, str):
            module, _, name = arg.partition(" ")
            names.append(f"{module}.{name}")
    return sorted(set(names))


def _stand_in(name: str) -> type[ScriptedObject]:
    return type("ScriptedObject", (ScriptedObject,), {"qualified_name": name})


def _unsupported_global(e: BaseException) -> str | None:
    """The global the weights-only unpickler refused, when that is why it failed."""
    text = str(e)
    if "GLOBAL" not in text:
        return None
    after = text.split("GLOBAL", 1)[1].split()
    return after[0][:120] if after else "an unknown global"


# --------------------------------------------------------------------------- the code's declarations
class _Declarations:
    """Each TorchScript class's declarations, parsed from the code record that defines it (once)."""

    def __init__(self, reader: Any, records: set[str], path: Path) -> None:
        self._reader, self._records, self._path = reader, records, path
        self._files: dict[str, dict[str, _Declared]] = {}

    def of(self, qualified_name: str) -> _Declared:
        module, _, cls = qualified_name.rpartition(".")
        record = "code/" + module.replace(".", "/") + ".py"
        if record not in self._files:
            self._files[record] = self._parse(record) if record in self._records else {}
        found = self._files[record].get(cls)
        if found is None:
            raise LoadError(f"cannot read {self._path}: its code does not define {qualified_name} (corrupt?)")
        return found

    def _parse(self, record: str) -> dict[str, _Declared]:
        try:
            tree = ast.parse(self._reader.get_record(record).decode("utf-8"), filename=record)
        except (SyntaxError, ValueError, RecursionError, MemoryError, UnicodeDecodeError, RuntimeError) as e:
            raise LoadError(
                f"cannot read {self._path}: {record} is not TorchScript source ({type(e).__name__})"
            ) from None
        return {node.name: _declared(node) for node in tree.body if isinstance(node, ast.ClassDef)}


def _declared(node: ast.ClassDef) -> _Declared:
    lists: dict[str, tuple[str, ...]] = {}
    for statement in node.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target = statement.targets[0]
            if isinstance(target, ast.Name) and target.id in ("__parameters__", "__buffers__"):
                value = statement.value
                items = value.elts if isinstance(value, (ast.List, ast.Tuple)) else []
                lists[target.id] = tuple(
                    e.value for e in items if isinstance(e, ast.Constant) and isinstance(e.value, str)
                )
    bases = {b.id for b in node.bases if isinstance(b, ast.Name)}
    restores = any(
        isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)) and s.name == "__setstate__" for s in node.body
    )
    return _Declared("Module" in bases, lists.get("__parameters__", ()), lists.get("__buffers__", ()), restores)


# --------------------------------------------------------------------------- the module tree
def _tensors(root: Any, declared: _Declarations, path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every parameter and buffer, module by module as ``state_dict`` orders
    them: a module's parameters, its buffers, then each submodule's, depth first. A stack, not
    recursion (a deep tree would exceed Python's limit); each object is visited once (a pickle can
    make cycles)."""
    if not isinstance(root, ScriptedObject):
        raise LoadError(f"cannot read {path}: its data.pkl holds a {type(root).__name__}, not a module")
    pending: list[tuple[str, ScriptedObject]] = [("", root)]
    seen: set[int] = set()
    emitted = 0
    while pending:
        prefix, obj = pending.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        about = declared.of(obj.qualified_name)
        if about.restores_itself:
            raise UnsafeLoadError(
                unsafe_message(
                    path,
                    f"a class that restores itself with its own code ({obj.qualified_name}.__setstate__)",
                    "loading it",
                )
            )
        state = getattr(obj, "saved_state", None)
        if not isinstance(state, dict):
            raise LoadError(
                f"cannot read {path}: {obj.qualified_name} was saved as a {type(state).__name__}, not its attributes"
            )
        for name in about.parameters + about.buffers:
            value = state.get(name)
            if isinstance(value, torch.Tensor):
                emitted += 1
                yield prefix + name, value.detach()
        children = [
            (prefix + str(key) + ".", value)
            for key, value in state.items()
            if isinstance(value, ScriptedObject) and declared.of(value.qualified_name).is_module
        ]
        emitted += len(children)
        if emitted > _MAX_STATE_ENTRIES:
            raise LoadError(f"refusing {path}: it names more than {_MAX_STATE_ENTRIES:,} tensors and modules")
        pending.extend(reversed(children))
