"""Zip archives from strangers: bounded reads, and a ``torch.export`` archive checked before torch reads it.

>>> check_export_archive(Path("model.pt2"))   # returns, or raises UnsafeLoadError / LoadError  # doctest: +SKIP

``torch.export.load`` is not a safe reader. It unpickles pickled weights and constants with
``weights_only=False``, unpickles any constant whose name starts with ``opaque_obj_`` with plain
``pickle``, loads compiled AOTInductor libraries, falls back to ``weights_only=False`` for sample
inputs and for the whole older flat layout, hands the program's shape expressions to
``sympy.sympify`` (which calls ``eval``), and writes the program's names into Python source that
``torch.fx`` compiles. Any of these runs code of the file's author.

So the check is allowlist-first: it knows the layouts torch writes (the current ``archive_format``
layout and the older flat one), refuses any member it does not know, refuses every member torch
would run as code, reads every member torch would unpickle with ``weights_only=True`` (torch's own
allowlist), accepts only strings in the program that cannot become code, and only node targets on
the allowlist of side-effect-free operators (:mod:`introspect.load.operators`). It reads the archive
through the same zip reader as torch does (``torch._C.PyTorchFileReader``), so both see the same
bytes; where torch switches to Python's ``zipfile`` (the older layout) it uses that.

Every read of an archive member here is bounded: a zip declares each member's size, and a few
kilobytes can declare gigabytes (a deflate bomb), so :func:`check_zip_sizes` refuses archives that
would inflate far beyond their own size before anything reads them.
"""

from __future__ import annotations

import functools
import io
import json
import re
import tokenize
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._torch import zip_reader
from ..errors import LoadError, UnsafeLoadError
from . import operators

__all__ = [
    "MAX_INFLATION",
    "check_zip_sizes",
    "read_member",
    "check_export_archive",
    "check_program",
    "check_sym_expr",
    "unsafe_message",
    "read_error",
    "is_weights_only_refusal",
]

MAX_INFLATION = 256 * 2**20
"""How many bytes all members of an archive may inflate to beyond the bytes they take in it.
torch writes its archives uncompressed, so a real checkpoint inflates by nothing; 256 MiB leaves
room for one re-zipped by hand, and bounds a 10 MB file's reads well under 1 GB."""

MAX_JSON = 256 * 2**20
"""The largest program or payload config read (a large language model's program is tens of MB)."""

MAX_EXPRESSION = 10_000
"""Characters in one shape expression; torch's are a few dozen."""

_FIRST_BYTES = 64  # enough of a marker member (``archive_format``, ``archive_version``)


# --------------------------------------------------------------------------- any zip
def check_zip_sizes(z: zipfile.ZipFile, path: Path) -> None:
    """Refuse an archive whose members inflate beyond ``MAX_INFLATION`` or repeat a name.

    The declared sizes are what both readers honour: Python's ``zipfile`` and torch's miniz stop
    at a member's declared size, so bounding the declared sizes bounds every read.
    """
    infos = z.infolist()
    inflation = sum(max(0, i.file_size - i.compress_size) for i in infos)
    if inflation > MAX_INFLATION:
        total = sum(i.file_size for i in infos)
        raise LoadError(
            f"refusing {path}: its members inflate to {_size(total)} from {_size(path.stat().st_size)} "
            f"(more than {_size(MAX_INFLATION)} beyond their stored size; a zip bomb?)"
        )
    counts = Counter(i.filename for i in infos)  # one pass: list.count per name took 57 s on 80k copies
    if len(counts) != len(infos):
        twice = min(n for n, c in counts.items() if c > 1)
        # Python's zipfile reads the last copy of a name and torch's reader the first: a check of
        # one copy would say nothing about the other.
        raise LoadError(f"refusing {path}: the zip archive holds {twice!r} more than once")


def read_member(z: zipfile.ZipFile, name: str, limit: int, path: Path) -> bytes:
    """The bytes of member ``name``, at most ``limit`` of them; a longer member is an error."""
    try:
        info = z.getinfo(name)
        if info.file_size > limit:
            raise LoadError(
                f"refusing {path}: {name} is {_size(info.file_size)}, more than the {_size(limit)} it may hold"
            )
        with z.open(info) as f:
            data = f.read(limit + 1)
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, RuntimeError, NotImplementedError) as e:
        # RuntimeError: an encrypted member; NotImplementedError: an unknown compression method
        raise LoadError(f"{path} is a corrupt zip archive ({name}: {e})") from e
    if len(data) > limit:
        raise LoadError(f"refusing {path}: {name} holds more than its declared {_size(limit)}")
    return data


# --------------------------------------------------------------------------- torch.export archives
_META_RECORDS = frozenset(
    {"archive_format", "archive_version", "byteorder", "version", ".data/version", ".data/serialization_id"}
)
_NAME = r"[A-Za-z0-9_\-]+"
_PROGRAM = re.compile(rf"models/({_NAME})\.json")
_SAMPLE_INPUTS = re.compile(rf"data/sample_inputs/{_NAME}\.pt")
_CONFIG = re.compile(rf"data/(weights|constants)/({_NAME})_(weights|constants)_config\.json")
_LEGACY_PAYLOAD = re.compile(rf"data/(weights|constants)/{_NAME}\.pt")
_PAYLOAD = {"weights": re.compile(r"weight_[0-9]+"), "constants": re.compile(r"tensor_[0-9]+")}
_PYTHON_OBJECT = re.compile(r"(custom_obj|opaque_obj)_.*")
_EXTRA = re.compile(r"extra/[^/]+")
_COMPILED = ("data/aotinductor/", "data/executorch/", "data/mtia")

_LEGACY_PROGRAM = "serialized_exported_program.json"
_LEGACY_PICKLES = frozenset(
    {
        "serialized_state_dict.pt",
        "serialized_state_dict.json",
        "serialized_constants.pt",
        "serialized_constants.json",
        "serialized_example_inputs.pt",
    }
)
_LEGACY_EXTRA = re.compile(r"extra_files/[^/]+")


def check_export_archive(path: Path) -> None:
    """Return when ``torch.export.load(path)`` can run no code of the file's author; raise otherwise.

    Raises:
        UnsafeLoadError: a part torch would unpickle holds arbitrary objects, or a part is code
            (an opaque or custom Python object, compiled AOTInductor code, Python guards).
        LoadError: a layout or member we do not know, or a corrupt part.
    """
    try:
        with zipfile.ZipFile(path) as z:
            check_zip_sizes(z, path)
            names = z.namelist()
            reader = _torch_reader(path)
            if "version" in names:  # torch.export.load's fallback for the older flat layout
                _check_flat_layout(z, names, reader, path)
            else:
                _check_current_layout(names, reader, path)
    except (zipfile.BadZipFile, UnicodeDecodeError) as e:
        raise LoadError(f"{path} is a corrupt zip archive: {e}") from e


def _torch_reader(path: Path) -> Any:
    """torch's own zip reader on ``path`` (the one ``torch.export.load`` uses), or None when it
    cannot open it."""
    try:
        return zip_reader(str(path))
    except (RuntimeError, UnicodeDecodeError):  # not a torch archive; a member name that is not UTF-8
        return None


def _check_current_layout(names: list[str], reader: Any, path: Path) -> None:
    try:
        members = list(reader.get_all_records()) if reader is not None else None
    except (RuntimeError, UnicodeDecodeError):  # "file in archive is not in a subdirectory"
        members = None
    if members is None:
        raise LoadError(
            f"{path}: not a torch.export archive torch can read (its members are not all in one top folder)"
        )
    root = names[0].split("/", 1)[0] if names else ""
    if sorted(names) != sorted(f"{root}/{m}" for m in members):
        raise LoadError(f"refusing {path}: its zip directory reads differently in Python and in torch")
    folded = [m.lower() for m in members]
    if len(set(folded)) != len(folded):  # torch looks names up ignoring case
        raise LoadError(f"refusing {path}: two members have the same name but for case")

    def record(name: str, limit: int = path.stat().st_size + MAX_INFLATION) -> bytes:
        size = reader.get_record_size(name)
        if size > limit:
            raise LoadError(f"refusing {path}: {name} is {_size(size)}, more than the {_size(limit)} it may hold")
        return reader.get_record(name)

    for marker, expected in (("archive_format", b"pt2"), ("archive_version", b"0")):
        if marker not in members or record(marker, _FIRST_BYTES).strip() != expected:
            raise LoadError(
                f"refusing {path}: not a torch.export archive of a layout we know ({marker} is not {expected.decode()})"
            )

    programs: list[str] = []
    configs: list[tuple[str, str]] = []
    pickled: list[str] = []
    for name in members:
        if name in _META_RECORDS or _EXTRA.fullmatch(name):
            continue
        if name.startswith(_COMPILED):
            raise UnsafeLoadError(unsafe_message(path, "compiled code (AOTInductor)", "loading it"))
        folder, _, leaf = name.rpartition("/")
        if _PROGRAM.fullmatch(name):
            programs.append(name)
        elif _SAMPLE_INPUTS.fullmatch(name) or _LEGACY_PAYLOAD.fullmatch(name):
            pickled.append(name)
        elif (found := _CONFIG.fullmatch(name)) and found.group(1) == found.group(3):
            configs.append((found.group(1), name))
        elif folder in ("data/weights", "data/constants") and _PAYLOAD[folder[5:]].fullmatch(leaf):
            continue  # raw tensor bytes, or pickled ones that a config marks (checked below)
        elif name.startswith("data/constants/") and _PYTHON_OBJECT.match(name[len("data/constants/") :]):
            raise UnsafeLoadError(unsafe_message(path, "a pickled Python object (a custom or opaque constant)"))
        else:
            raise LoadError(f"refusing {path}: it holds {name}, which is no part of a torch.export archive we know")
    if not programs:
        raise LoadError(f"refusing {path}: a torch.export archive without a program (models/<name>.json)")

    for name in programs:
        check_program(_json(record(name, MAX_JSON), name, path), name, path)
    sizes = {m: reader.get_record_size(m) for m in members if m.startswith(("data/weights/", "data/constants/"))}
    for kind, name in configs:
        pickled += _config_pickles(_json(record(name, MAX_JSON), name, path), kind, name, members, sizes, path)
    for name in pickled:
        _check_pickle(record(name), name, path)


def _config_pickles(
    config: Any, kind: str, name: str, members: list[str], reader_sizes: dict[str, int], path: Path
) -> list[str]:
    """The members a weights or constants config marks as pickled; refuses entries torch would not
    read as plain tensors (a path outside the folder, an opaque or custom object)."""
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise LoadError(f'refusing {path}: {name} is not a payload config ({{"config": {{...}}}})')
    check_program(entries, name, path)
    pickled = []
    for fqn, entry in entries.items():
        leaf = entry.get("path_name") if isinstance(entry, dict) else None
        if not isinstance(leaf, str) or not _PAYLOAD[kind].fullmatch(leaf):
            if isinstance(leaf, str) and _PYTHON_OBJECT.match(leaf):
                raise UnsafeLoadError(unsafe_message(path, f"a pickled Python object ({fqn!r} in {name})"))
            raise LoadError(f"refusing {path}: {name} points {fqn!r} at {leaf!r}, not a {kind} file of this archive")
        member = f"data/{kind}/{leaf}"
        if member not in members:
            raise LoadError(f"refusing {path}: {name} points {fqn!r} at {member}, which the archive lacks")
        if entry.get("use_pickle") is not False:  # torch unpickles on any true value
            pickled.append(member)
        elif reader_sizes.get(member) == 0 and _declared_elements(entry) * 8 > MAX_INFLATION:
            # torch fills an empty record with torch.zeros(sizes): no bytes in the file could
            # claim terabytes of memory
            raise LoadError(
                f"refusing {path}: {name} declares {fqn!r} with {_declared_elements(entry):,} elements "
                "and no bytes behind them"
            )
    return pickled


def _declared_elements(entry: dict) -> int:
    """How many elements a payload entry's ``tensor_meta`` declares."""
    meta = entry.get("tensor_meta")
    sizes = meta.get("sizes") if isinstance(meta, dict) else None
    if not isinstance(sizes, list):
        return 0
    total = 1
    for size in sizes:
        value = size.get("as_int") if isinstance(size, dict) else None
        if not isinstance(value, int) or value < 0:
            return MAX_INFLATION  # symbolic or odd: no plain weight has such a size
        total *= value
    return total


def _check_flat_layout(z: zipfile.ZipFile, names: list[str], reader: Any, path: Path) -> None:
    """The layout of torch 2.7 and before, read by ``torch.export.load`` with Python's zipfile."""
    if reader is not None and reader.has_record("archive_format"):
        # torch would read the current layout first and fall back to the flat one on an error:
        # two programs in one file, one of them unchecked.
        raise LoadError(f"refusing {path}: it mixes the current torch.export layout with the older flat one")
    for name in names:
        if (
            name != "version"
            and name != _LEGACY_PROGRAM
            and name not in _LEGACY_PICKLES
            and not _LEGACY_EXTRA.fullmatch(name)
        ):
            raise LoadError(f"refusing {path}: it holds {name}, which is no part of a torch.export archive we know")
    if _LEGACY_PROGRAM not in names:
        raise LoadError(f"refusing {path}: an older torch.export archive without {_LEGACY_PROGRAM}")
    check_program(_json(read_member(z, _LEGACY_PROGRAM, MAX_JSON, path), _LEGACY_PROGRAM, path), _LEGACY_PROGRAM, path)
    for name in sorted(_LEGACY_PICKLES & set(names)):
        size = z.getinfo(name).file_size
        data = read_member(z, name, size, path)
        if data:  # torch reads an empty part as {}
            _check_pickle(data, name, path)


def _check_pickle(data: bytes, name: str, path: Path) -> None:
    """Unpickle ``data`` as torch would, with only torch's allowlist of globals."""
    import torch

    try:
        torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:
        raise read_error(path, e, part=name) from (None if is_weights_only_refusal(e) else e)


def _json(data: bytes, name: str, path: Path) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        raise LoadError(f"cannot read {path}: {name} is not valid JSON ({_reason(e)})") from None


# --------------------------------------------------------------------------- the program's strings
# Names, targets and attribute paths: torch.fx writes them into the Python source of the loaded
# module (``def forward(self, <name>)``, ``getattr(self, "<atom>")``), so a name with ``=``, a
# quote or a bracket in it is code. torch's own names are identifiers and dotted paths.
_PLAIN = re.compile(r"[A-Za-z0-9_.\-]*")
_EXTENSION_TARGET = re.compile(r"#[A-Za-z0-9_.]+:[A-Za-z0-9_.]+")
_MODULE_STACK = re.compile(r"[A-Za-z0-9_.,;@<>\-]*")  # "key,path,type;...": relu@1 (a reused module), f.<locals>.Net
_VERSION = re.compile(r"[A-Za-z0-9_.+\-]*")
# Free text that never becomes code: string constants (repr()'d into the source), annotations. A
# stack trace's last line becomes a comment in the source; a carriage return there would end it.
_FREE_TEXT = frozenset({"as_string", "as_strings", "custom", "stack_trace"})
_NO_LINE_BREAKS = re.compile(r"[^\r\x00]*")


def check_program(program: Any, name: str, path: Path) -> None:
    """Refuse a program (or payload config) with any string that could become code when torch
    deserializes it: a name or path beyond ``[A-Za-z0-9_.-]``, a shape expression beyond the
    arithmetic torch writes, a pytree spec with such strings, or guards (Python source)."""
    try:
        _walk(program, "", lambda key, text: _check_string(key, text, name, path))
    except RecursionError:
        raise LoadError(f"refusing {path}: {name} nests deeper than any program torch writes") from None


def _walk(node: Any, key: str, visit: Callable[[str, str], None]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            visit("<key>", k)
            _walk(v, k, visit)
    elif isinstance(node, list):
        for v in node:
            _walk(v, key, visit)
    elif isinstance(node, str):
        visit(key, node)


def _check_string(key: str, text: str, name: str, path: Path) -> None:
    if key == "guards_code":
        raise UnsafeLoadError(unsafe_message(path, f"guards as Python source in {name}", "compiling them"))
    if key == "expr_str":
        problem = check_sym_expr(text)
    elif key in ("in_spec", "out_spec"):
        problem = _check_treespec(text)
    elif key in _FREE_TEXT:
        problem = None if _NO_LINE_BREAKS.fullmatch(text) else "a carriage return or NUL"
    elif key in ("target", "as_operator"):
        if not _PLAIN.fullmatch(text) and not _EXTENSION_TARGET.fullmatch(text):
            problem = "an operator name beyond [A-Za-z0-9_.-]"
        elif (operator_problem := operators.target_problem(text)) is not None:  # side-effect-free ones only
            raise UnsafeLoadError(unsafe_message(path, f"{operator_problem} in {name}", "running it", operators.RISK))
        else:
            problem = None
    elif key in ("nn_module_stack", "source_fn_stack", "torch_fn"):
        problem = None if _MODULE_STACK.fullmatch(text) else "a module path beyond [A-Za-z0-9_.,;@<>-]"
    elif key == "torch_version":
        problem = None if _VERSION.fullmatch(text) else "a version beyond [A-Za-z0-9_.+-]"
    else:
        problem = None if _PLAIN.fullmatch(text) else "a name beyond [A-Za-z0-9_.-]"
    if problem is not None:
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise UnsafeLoadError(
            unsafe_message(
                path,
                f"a string torch would turn into code ({key or 'a value'} {shown!r} in {name}: {problem})",
                "loading it",
            )
        )


def _check_treespec(text: str) -> str | None:
    """A pytree spec (``[1, {"type": ..., "context": "<json>", "children_spec": [...]}]``): its
    types and its contexts' keys reach generated source (a kwargs dict's keys), so they must be plain."""
    try:
        spec = json.loads(text)
    except (ValueError, RecursionError):
        return "not a pytree spec"
    problems: list[str] = []

    def visit(key: str, value: str) -> None:
        if key == "context":
            try:
                _walk(json.loads(value), "", visit)
            except (ValueError, RecursionError):
                problems.append("a context that is not JSON")
        elif not _PLAIN.fullmatch(value):
            problems.append("a key or type beyond [A-Za-z0-9_.-]")

    try:
        _walk(spec, "", visit)
    except RecursionError:
        return "nested too deep"
    return problems[0] if problems else None


# Shape expressions: torch passes them to sympy.sympify, which evaluates them as Python with the
# builtins in reach (``exec(chr(105)+...)`` runs anything). What torch writes is sympy's srepr
# (``Mul(Integer(2), Symbol('s0', positive=True, integer=True))``) or, in older files, infix
# (``2*s0 + 1``): names of sympy and torch functions, symbols, numbers and arithmetic. Nothing else
# passes: no attribute access, no subscripts, no other names, no other strings.
_SYMPY_NAMES = frozenset(
    {
        "Symbol",
        "Integer",
        "Float",
        "Rational",
        "Add",
        "Mul",
        "Pow",
        "Max",
        "Min",
        "Abs",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "StrictLessThan",
        "StrictGreaterThan",
        "LessThan",
        "GreaterThan",
        "Equality",
        "Unequality",
        "And",
        "Or",
        "Not",
        "Piecewise",
        "ExprCondPair",
        "true",
        "false",
        "oo",
        "zoo",
        "nan",
        "Infinity",
        "NegativeInfinity",
        "NaN",
        "Half",
        "One",
        "Zero",
        "NegativeOne",
        "floor",
        "ceiling",
        "BooleanTrue",
        "BooleanFalse",
    }
)
_KEYWORDS = frozenset({"precision", "evaluate", "commutative"})
_EXPONENTIALS = frozenset({"Pow", "PowByNatural", "FloatPow", "LShift", "**"})
_MAX_EXPONENT = 16  # s0**2 is what shapes need; 2**(10**18) would fill memory
_MAX_EXPONENTIALS = 3  # nested powers multiply: (2**63)**(16**3) is still small
_OPERATORS = frozenset(
    {"+", "-", "*", "/", "//", "%", "(", ")", ",", "=", "<", ">", "<=", ">=", "==", "!=", "~", "&", "|", "**"}
)
_INTEGER = re.compile(r"[0-9]{1,19}")
_FLOAT = re.compile(r"([0-9]+\.[0-9]*|\.[0-9]+)([eE][+-]?[0-9]{1,3})?")
_STRING = re.compile(r"'[A-Za-z0-9_.+\-]*'")
_STRING_TAKERS = frozenset({"Symbol", "Float", "Integer", "Rational"})
_SYMBOL = re.compile(r"[a-z]{1,4}[0-9]{1,9}")  # s0, u3, zuf1: torch's symbol names
_OPAQUE_FUNCTION = re.compile(r"OpaqueUnaryFn_[a-z0-9_]+")


def check_sym_expr(text: str) -> str | None:
    """None when ``text`` is a shape expression sympy can evaluate without running code or filling
    memory; otherwise what is wrong with it."""
    if len(text) > MAX_EXPRESSION:
        return f"longer than {MAX_EXPRESSION} characters"
    try:
        tokens = [
            t
            for t in tokenize.generate_tokens(io.StringIO(text).readline)
            if t.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER)
        ]
    except (tokenize.TokenError, SyntaxError) as e:
        return f"not an expression ({e})"
    names = _expression_names()
    exponentials = 0
    calls: list[bool] = []  # per open parenthesis: a call's arguments (True) or a grouping (False)
    for i, token in enumerate(tokens):
        kind, value = token.type, token.string
        previous = tokens[i - 1] if i else None
        following = tokens[i + 1].string if i + 1 < len(tokens) else ""
        if value == "(":
            calls.append(previous is not None and previous.type == tokenize.NAME)
        elif value == ")" and calls:
            calls.pop()
        elif value == "," and not (calls and calls[-1]):
            return "a tuple"  # (s0, s1) * 10**18 would be Python's tuple repetition, not sympy's
        if kind == tokenize.NAME:
            known = (
                value in names
                or value in ("True", "False")
                or _OPAQUE_FUNCTION.fullmatch(value)
                or (following == "=" and value in _keyword_names())
                or (_SYMBOL.fullmatch(value) and value not in _sympy_namespace())
            )
            if not known:
                return f"the name {value[:40]!r}"
        elif kind == tokenize.NUMBER:
            if not (_INTEGER.fullmatch(value) or _FLOAT.fullmatch(value)):
                return f"the number {value!r}"
        elif kind == tokenize.STRING:
            # Only as the first argument of Symbol('s0', ...) or Float('1.5', ...): a string
            # anywhere else could be repeated ('1' * 10**18) before sympy sees it.
            opener = tokens[i - 2].string if i >= 2 else ""
            if not (
                _STRING.fullmatch(value)
                and previous is not None
                and previous.string == "("
                and opener in _STRING_TAKERS
                and following in (",", ")")
            ):
                return f"the string {value!r}"
        elif kind != tokenize.OP or value not in _OPERATORS:
            return f"{value!r}"
        if value in _EXPONENTIALS:
            exponentials += 1
            if exponentials > _MAX_EXPONENTIALS or not _small_exponent(tokens, i):
                return f"a power beyond {_MAX_EXPONENTIALS} powers of small integer exponents (<= {_MAX_EXPONENT})"
    return None


def _small_exponent(tokens: list[tokenize.TokenInfo], at: int) -> bool:
    """Whether the exponential at ``tokens[at]`` (``x ** k`` or ``Pow(x, k)``) has a literal
    exponent ``k`` of at most ``_MAX_EXPONENT``, as ``2`` or ``Integer(2)``."""
    if tokens[at].string == "**":
        exponent = [t.string for t in tokens[at + 1 : at + 2]]
    else:  # the second argument of the call: after the first top-level comma, up to the next
        if at + 1 >= len(tokens) or tokens[at + 1].string != "(":
            return False
        depth, start, end = 0, None, None
        for j in range(at + 1, len(tokens)):
            s = tokens[j].string
            if s == "(":
                depth += 1
            elif s == ")":
                depth -= 1
                if depth == 0:
                    end = j
                    break
            elif s == "," and depth == 1:
                if start is not None:
                    end = j
                    break
                start = j + 1
        if start is None or end is None:
            return False
        exponent = [t.string for t in tokens[start:end]]
    if exponent[:2] == ["Integer", "("] and exponent[-1:] == [")"]:
        exponent = exponent[2:-1]
    if exponent[:1] == ["-"]:
        exponent = exponent[1:]
    return len(exponent) == 1 and exponent[0].isdigit() and int(exponent[0]) <= _MAX_EXPONENT


@functools.lru_cache(maxsize=1)
def _expression_names() -> frozenset[str]:
    import torch.utils._sympy.functions as functions

    return _SYMPY_NAMES | frozenset(getattr(functions, "__all__", ()))


@functools.lru_cache(maxsize=1)
def _keyword_names() -> frozenset[str]:
    try:
        from sympy.core.assumptions import (
            _assume_defined,  # the assumptions Symbol() takes
        )
    except ImportError:  # pragma: no cover - sympy moved it
        _assume_defined = frozenset({"integer", "positive", "negative", "nonnegative", "nonpositive", "real", "finite"})
    return _KEYWORDS | frozenset(_assume_defined)


@functools.lru_cache(maxsize=1)
def _sympy_namespace() -> frozenset[str]:
    """Names sympify resolves to something other than a new symbol (``factorial2``, ``hn1``)."""
    import builtins

    import sympy

    return frozenset(dir(sympy)) | frozenset(dir(builtins))


# --------------------------------------------------------------------------- messages
def is_weights_only_refusal(e: BaseException) -> bool:
    """Whether ``torch.load(weights_only=True)`` refused the file for a global outside its allowlist
    (not for being corrupt, which torch words with the same first line)."""
    text = str(e).lower()
    return ("weights only load failed" in text or "weights_only" in text) and "global" in text


def unsafe_message(path: Path, what: str, action: str = "unpickling", risk: str = "runs arbitrary code") -> str:
    """Why ``path`` is refused, and what ``--unsafe`` would risk (``action``: what would act;
    ``risk``: what it could do)."""
    return (
        f"refusing to load {path}: it holds {what}, and {action} {risk} — a file "
        "can do anything your account can. If you trust its source, pass --unsafe (unsafe=True); "
        "better, save model.state_dict() and load it with --arch"
    )


def read_error(path: Path, e: BaseException, part: str = "") -> LoadError:
    """The one-line error for a reader's failure on ``path`` (or its member ``part``).

    A weights-only refusal names ``--unsafe`` and its risk. torch's own message opens with advice
    to pass ``weights_only=False``, which would run the file's code without saying so; it is
    never shown, for a refusal or for a corrupt file (whose message opens the same way).
    """
    inside = f" in {part}" if part else ""
    if is_weights_only_refusal(e):
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        needs = f" (it needs {found.group(1)})" if found else ""
        return UnsafeLoadError(unsafe_message(path, f"Python objects beyond tensors{inside}{needs}"))
    reason = _reason(e)
    return LoadError(
        f"cannot read {path}{inside} (corrupt or truncated?): {type(e).__name__}" + (f": {reason}" if reason else "")
    )


_TORCH_ADVICE = ("weights only load failed", "please file an issue", "check the documentation of torch.load")


def _reason(e: BaseException) -> str:
    """The line of an error that says what is wrong, past torch's weights-only boilerplate."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if lines and lines[0].lower().startswith(_TORCH_ADVICE[0]):
        lines = [line for line in lines if not line.lower().startswith(_TORCH_ADVICE)]
    return lines[0][:300] if lines else ""


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover
