#!/usr/bin/env python3
"""What ``watch`` costs per training step, next to bare training and the alternatives.

Run it through ``scripts/bench`` (which makes .venv first), or directly with any Python: it
re-executes itself under the repository's ``.venv/bin/python`` when that exists.

    scripts/bench --quick                         # a smoke run: under 2 minutes on 2 CPU cores
    scripts/bench                                 # the full run (roughly 20 minutes on 2 cores)
    scripts/bench --device cuda --models cnn,resnet18 --rounds 7
    scripts/bench --out /tmp/bench.md             # the plot goes beside it: /tmp/bench.png
    scripts/bench --faults                        # only the fault table: who finds which NaN/Inf

Method (this VM is noisy: only interleaved, same-process comparisons over several rounds resolve
a few per cent): each model runs in a process of its own, forked from this one once torch is
imported (and before any torch op has run). It first measures peak memory, one forked child per
variant (on CUDA: one fresh process per variant), each training only that variant for a few
steps. Then it builds every variant side by side (own model copy, optimizer and SummaryWriter),
warms each up, and runs R rounds; in each round every variant trains a chunk of K steps, in a new
random order, and the chunk's time includes ``writer.flush()`` (the writer thread's work belongs
to the variant that queued it); an untimed pause and lead-in step before each chunk let threads
the previous chunk left spinning go idle and warm this variant up again. Reported: median
per-step time over rounds, and the median over rounds of each round's ratio to (and difference
from) bare training in the same round. On CUDA it then counts each variant's host syncs per step
(``torch.cuda.set_sync_debug_mode("warn")``), off its logging cadence and on it. Last, the fault
table (in this process, on CPU): four planted faults under three NaN detectors (this project,
``detect_anomaly``, naive ``isfinite`` hooks), what each names, and at what cost per step.
``--help`` lists the options.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
_VENV_PY = REPO / ".venv" / "bin" / "python"
if (
    _VENV_PY.exists()
    and Path(sys.prefix).resolve() != (REPO / ".venv").resolve()
    and not os.environ.get("INTROSPECT_BENCH_NO_REEXEC")
):
    os.environ["INTROSPECT_BENCH_NO_REEXEC"] = "1"
    os.execv(str(_VENV_PY), [str(_VENV_PY), str(Path(__file__).resolve()), *sys.argv[1:]])

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import datetime  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402

MODELS = ("cnn", "mlp", "resnet18", "transformer", "gpt2")
ATTENTION_MODELS = ("transformer", "gpt2")  # the models the attention probe's on/off pair runs on

# key -> (label, cadence in steps of its logging, or None when it never logs after step 0)
VARIANTS: dict[str, tuple[str, int | None]] = {
    "bare": ("bare loop", None),
    "tb_every1": ("tutorial: add_histogram of every param + grad, every step", 1),
    "tb_every100": ("tutorial: add_histogram of every param + grad, every 100 steps", 100),
    "watch_default": ("watch(), default cadence", None),  # cadence filled in from DEFAULT_EVERY
    "watch_every1": ("watch(every=1, optimizer=opt): everything on", 1),
    "watch_check": ("watch(every=10**9): non-finite check only", None),
    "watch_hooks": ("watch(every=10**9, check_every=0): hooks only", None),
    # The transformer pack's attention probe, on and off (its cost is the difference).
    "watch_every1_no_attn": ("watch(every=1, optimizer=opt), attention probe off", 1),
    "watch_check_no_attn": ("watch(every=10**9), attention probe off", None),
    # The two ways to find a NaN without this project (the fault table says what each finds).
    "detect_anomaly": ("detect_anomaly: set_detect_anomaly(True, check_nan=True) around each step", None),
    "isfinite_hooks": ("naive isfinite hooks: host read of isfinite(t).all() per module output and its grad", None),
    "wandb_1": ('wandb.watch(log="all", log_freq=1), offline', 1),
    "wandb_100": ('wandb.watch(log="all", log_freq=100), offline', 100),
}

# Steps per chunk (K) and warm-up steps per variant. In a full run a variant that logs every c
# steps runs chunks of a multiple of c steps, so every chunk holds the same number of its logging
# steps; --quick keeps all chunks at K (sparse cadences then show their off-cadence cost only).
FULL_STEPS = {"cnn": 100, "mlp": 200, "resnet18": 20, "transformer": 100, "gpt2": 50}
QUICK_STEPS = {"cnn": 4, "mlp": 25, "resnet18": 1, "transformer": 5, "gpt2": 4}
FULL_WARMUP = {"cnn": 5, "mlp": 20, "resnet18": 2, "transformer": 5, "gpt2": 5}
QUICK_WARMUP = {"cnn": 2, "mlp": 5, "resnet18": 1, "transformer": 2, "gpt2": 2}
FULL_ROUNDS, QUICK_ROUNDS = 5, 3
SETTLE_S, QUICK_SETTLE_S = 0.2, 0.05  # pause before each timed chunk, outside its time
LEAD_IN_STEPS, QUICK_LEAD_IN_STEPS = 1, 0  # untimed steps right before each timed chunk
FULL_MEM_STEPS, QUICK_MEM_STEPS = 10, 1  # step 0 is a logging step for all but log_freq=100


# ============================================================================ models and variants
def _seed_cnn_class():
    spec = importlib.util.spec_from_file_location("_bench_examples_models", REPO / "examples" / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SeedCNN


GPT2_SIZE = dict(n_layer=2, n_head=4, n_embd=128, vocab_size=1024, n_positions=64)
GPT2_BATCH = 8


def tiny_gpt2():
    """GPT-2 with two blocks from ``GPT2Config`` (random weights, nothing downloaded): a CPU step
    of tens of ms, where per-module Python overhead is a visible share of the step."""
    import transformers

    config = transformers.GPT2Config(**GPT2_SIZE, bos_token_id=0, eos_token_id=0, loss_type="ForCausalLM")
    return transformers.GPT2LMHeadModel(config)


def train_loss(model, x, y):
    """The step's loss. ``y is None`` marks a causal LM trained with its own loss (the labels are
    the input ids, shifted inside the model); every other model is a binary classifier."""
    import torch.nn.functional as F

    if y is None:
        return model(input_ids=x, labels=x).loss
    return F.binary_cross_entropy_with_logits(model(x), y)


def build_model(name: str, device: str):
    """(model, x, y, description) for one benchmark model, seeded, on ``device``; ``y`` is None
    for the language model (see :func:`train_loss`)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "gpt2":
        model = tiny_gpt2()
        x = torch.randint(0, GPT2_SIZE["vocab_size"], (GPT2_BATCH, GPT2_SIZE["n_positions"]))
        desc = (
            f"GPT-2 tiny (transformers GPT2Config, random weights): {GPT2_SIZE['n_layer']} blocks, "
            f"{GPT2_SIZE['n_head']} heads, n_embd {GPT2_SIZE['n_embd']}, vocab {GPT2_SIZE['vocab_size']}, "
            f"batch {GPT2_BATCH} of {GPT2_SIZE['n_positions']} tokens, its own LM loss (labels=input_ids), Adam"
        )
        return model.to(device), x.to(device), None, desc
    if name == "cnn":
        model = _seed_cnn_class()()
        x = torch.randn(64, 3, 32, 32)
        y = torch.randint(0, 2, (64, 1)).float()
        desc = "SeedCNN (examples/models.py), batch 64 of 3x32x32"
    elif name == "mlp":
        model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
        x = torch.randn(16, 2) * 1.5
        y = (x.norm(dim=1, keepdim=True) > 1.2).float()  # inside/outside a ring
        desc = "ring MLP 2-16-8-1 with ReLU, batch 16 (per-step overhead dominates)"
    elif name == "resnet18":
        import torchvision

        if device == "cuda":
            model = torchvision.models.resnet50(weights=None, num_classes=1)
            x = torch.randn(128, 3, 224, 224)
            y = torch.randint(0, 2, (128, 1)).float()
            desc = "torchvision resnet50 (weights=None; the GPU size), batch 128 at 224x224"
        else:
            model = torchvision.models.resnet18(weights=None, num_classes=1)
            x = torch.randn(16, 3, 64, 64)
            y = torch.randint(0, 2, (16, 1)).float()
            desc = "torchvision resnet18 (weights=None), batch 16 at 64x64"
    elif name == "transformer":

        class TinyTransformer(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                layer = nn.TransformerEncoderLayer(
                    d_model=64, nhead=4, dim_feedforward=128, dropout=0.1, batch_first=True
                )
                self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
                self.head = nn.Linear(64, 1)

            def forward(self, x):
                return self.head(self.encoder(x).mean(dim=1))

        model = TinyTransformer()
        x = torch.randn(32, 32, 64)
        y = torch.randint(0, 2, (32, 1)).float()
        desc = "nn.TransformerEncoder, d_model 64, 4 heads, 2 layers, batch 32 of 32 tokens"
    else:
        raise ValueError(f"unknown model {name!r}")
    desc += ", BCEWithLogits, Adam"
    return model.to(device), x.to(device), y.to(device), desc


def wandb_available() -> str | None:
    """wandb's version, or None when it is not installed (found without importing it)."""
    if importlib.util.find_spec("wandb") is None:
        return None
    try:
        return importlib.metadata.version("wandb")
    except importlib.metadata.PackageNotFoundError:
        return "unknown version"


class IsfiniteHooks:
    """The NaN check a user writes by hand: a forward hook on every module that reads
    ``torch.isfinite(out).all()`` on the host for each output, and a hook on each output tensor
    that does the same for the gradient arriving there. ``first`` is the first flag raised:
    (module name, "forward" or "backward", step); ``step`` is the caller's to advance."""

    def __init__(self, model) -> None:
        from introspect.runtime.tensors import named_float_tensors

        self._tensors = named_float_tensors
        self.step = 0
        self.first: tuple[str, str, int] | None = None
        self._handles = []
        try:
            for name, module in model.named_modules():
                self._handles.append(module.register_forward_hook(self._output_hook(name)))  # "": the root
        except BaseException:
            self.remove()
            raise

    def _flag(self, name: str, phase: str) -> None:
        if self.first is None:
            self.first = (name, phase, self.step)

    def _output_hook(self, name: str):
        import torch

        def grad_hook(grad) -> None:
            if not bool(torch.isfinite(grad).all()):  # one host read per gradient
                self._flag(name, "backward")

        def hook(module, args, output) -> None:
            for _, tensor in self._tensors(output):
                if not bool(torch.isfinite(tensor).all()):  # one host read per output
                    self._flag(name, "forward")
                if tensor.requires_grad:
                    tensor.register_hook(grad_hook)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class Runner:
    """One variant: its own model, Adam optimizer and SummaryWriter, and its own step counter."""

    def __init__(self, key, model, x, y, device, logdir, wandb_run=None):
        import torch
        from torch.utils.tensorboard import SummaryWriter

        self.key = key
        self.model = model
        self.x, self.y = x, y
        self.device = device
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        self.writer = SummaryWriter(str(logdir))
        self.step_no = 0
        self.hist_every = {"tb_every1": 1, "tb_every100": 100}.get(key)
        self.wandb_freq = {"wandb_1": 1, "wandb_100": 100}.get(key)
        self.wandb_run = wandb_run
        self._stack = contextlib.ExitStack()
        self._torch = torch
        self.isfinite = None
        if key == "isfinite_hooks":
            self.isfinite = IsfiniteHooks(model)
            self._stack.callback(self.isfinite.remove)
        elif key.startswith("watch"):
            from introspect import watch

            opts = {
                "watch_default": {},
                "watch_every1": {"every": 1, "optimizer": self.opt},
                "watch_check": {"every": 10**9},
                "watch_hooks": {"every": 10**9, "check_every": 0},
                "watch_every1_no_attn": {"every": 1, "optimizer": self.opt},
                "watch_check_no_attn": {"every": 10**9},
            }[key]
            w = self._stack.enter_context(watch(model, self.writer, summary=False, graph=False, **opts))
            if key.endswith("_no_attn"):
                w.ctx.disabled.add("<probe attention>")  # the dispatch then never makes it active
        elif self.wandb_freq:
            import wandb

            wandb.watch(model, log="all", log_freq=self.wandb_freq)

    def step(self) -> None:
        if self.isfinite is not None:
            self.isfinite.step = self.step_no
        # Anomaly mode is a thread-wide switch: on for this variant's own step only (the other
        # variants run interleaved in this thread). set_detect_anomaly, unlike detect_anomaly,
        # does not warn on every entry.
        anomaly = (
            self._torch.autograd.set_detect_anomaly(True, check_nan=True)
            if self.key == "detect_anomaly"
            else contextlib.nullcontext()
        )
        with anomaly:
            loss = train_loss(self.model, self.x, self.y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        if self.hist_every and self.step_no % self.hist_every == 0:
            # The TensorBoard tutorial way: a histogram of every parameter and of its gradient.
            for name, p in self.model.named_parameters():
                self.writer.add_histogram(name, p, self.step_no)
                if p.grad is not None:
                    self.writer.add_histogram(f"{name}.grad", p.grad, self.step_no)
        self.opt.step()
        # wandb.watch's hooks log with commit=False on every log_freq-th call; the user's next
        # wandb.log commits them. Commit exactly on those steps, so no per-step wandb.log is
        # counted that the other variants do not pay for.
        if self.wandb_freq and (self.step_no + 1) % self.wandb_freq == 0:
            self.wandb_run.log({}, commit=True)
        self.step_no += 1

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()
        self.writer.flush()
        if self.device == "cuda":
            self._torch.cuda.synchronize()

    def close(self, finish_watch: bool = True) -> None:
        """Remove the variant's hooks and close its writer. ``finish_watch=False`` leaves the
        watcher's end-of-run work undone (its last step and grad-flow figure, ~1 s each): for a
        process that ends right after, where it would only cost time."""
        try:
            if finish_watch:
                self._stack.close()
        finally:
            self.writer.close()
            if self.wandb_freq:
                import wandb

                with contextlib.suppress(Exception):
                    wandb.unwatch(self.model)


def _wandb_init(tmp: Path):
    import wandb

    return wandb.init(mode="offline", dir=str(tmp), project="introspect-bench", settings=wandb.Settings(console="off"))


def measure_memory(model_name: str, key: str, device: str, steps: int) -> dict:
    """Train only variant ``key`` for ``steps`` steps in this (fresh) process; its peak memory."""
    import torch

    with tempfile.TemporaryDirectory(prefix=f"bench-mem-{key}-") as tmp:
        model, x, y, _ = build_model(model_name, device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run = _wandb_init(Path(tmp)) if key.startswith("wandb") else None
        runner = Runner(key, model, x, y, device, Path(tmp) / "tb", run)
        with contextlib.redirect_stdout(io.StringIO()):
            runner.run(steps)
        out = {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if device == "cuda":
            out["cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        runner.close(finish_watch=False)  # this process ends right after
        if run is not None:
            with contextlib.redirect_stdout(io.StringIO()):
                run.finish()
    return out


def _fork_child(fn, timeout_s: float) -> tuple[int, int]:
    """Start fn() in a forked child that writes its JSON-able result (or {"error": ...}) to a
    pipe; (pid, read end). The parent must not have run a parallel torch op yet (no OpenMP pool
    to inherit) nor touched CUDA."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        signal.alarm(max(1, int(timeout_s)))
        try:
            result = {"ok": fn()}
        except BaseException:  # noqa: BLE001 - everything goes back to the parent as text
            result = {"error": traceback.format_exc(limit=6)}
        try:
            with os.fdopen(write_fd, "wb") as f:
                f.write(json.dumps(result).encode())
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(0)
    os.close(write_fd)
    return pid, read_fd


def _collect_child(pid: int, read_fd: int, timeout_s: float) -> dict:
    with os.fdopen(read_fd, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        return {"error": f"memory child died (wait status {status}; timeout {timeout_s:.0f} s)"}
    return json.loads(data)


def _in_fresh_process(args, model: str, key: str, timeout_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-memproc-") as tmp:
        path = Path(tmp) / "mem.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--_mem",
            model,
            "--_variant",
            key,
            "--device",
            args.device,
            "--_mem-steps",
            str(args._mem_steps),
            "--_json",
            str(path),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"memory process timed out after {timeout_s:.0f} s"}
        if path.exists():
            return json.loads(path.read_text())
        return {"error": f"memory process failed (exit {proc.returncode}): {proc.stderr[-2000:]}"}


# ============================================================================ the worker
def _time_one_off(base, x, y, device, tmp: Path, reps: int) -> dict:
    """One-time cost of summary=True, graph=True: the first batch under watch with both on minus
    the same with both off (both: fresh model copy, watch entered and left, writer flushed).
    A first uncounted run with both off pays the process's first-time costs (imports, the
    grad-flow figure's first draw); then the best of ``reps`` runs of each."""
    from introspect import watch

    best: dict[str, float] = {}
    caught: list[str] = []
    plan = [("warm-up", False)] + [
        (label, flags) for _ in range(reps) for label, flags in (("on", True), ("off", False))
    ]
    for i, (label, flags) in enumerate(plan):
        model = copy.deepcopy(base)
        runner = Runner("bare", model, x, y, device, tmp / f"oneoff-{i}-{label}")
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                with watch(model, runner.writer, every=10**9, check_every=0, summary=flags, graph=flags):
                    runner.run(1)
            runner.writer.flush()
            elapsed = time.perf_counter() - t0
        if flags:
            caught += [f"{w.category.__name__}: {w.message}" for w in ws]
        runner.close()
        if label != "warm-up":
            best[label] = min(best.get(label, float("inf")), elapsed)
    return {
        "on_s": best["on"],
        "off_s": best["off"],
        "added_s": best["on"] - best["off"],
        "warnings": sorted(set(caught))[:3],
    }


def logging_step_tensors(model, x, y) -> list:
    """What a logging step of ``watch(every=1)`` takes statistics of: every watched module's
    output and the gradient w.r.t. it, every watched parameter and its gradient (one training
    step's forward and backward; the tensors are detached copies, kept for timing)."""
    from introspect.runtime.selection import select_modules, select_parameters
    from introspect.runtime.tensors import named_float_tensors

    modules = select_modules(model)
    params = select_parameters(model, modules)
    found: list = []

    def hook(module, args, output):
        for _, t in named_float_tensors(output):
            found.append(t.detach().clone())
            if t.requires_grad:
                t.register_hook(lambda g: found.append(g.detach().clone()))

    handles = [m.register_forward_hook(hook) for m in modules.values()]
    try:
        train_loss(model, x, y).backward()
    finally:
        for h in handles:
            h.remove()
    found += [p.detach().clone() for p in params.values()]
    found += [p.grad.detach().clone() for p in params.values() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return [t for t in found if t.numel() > 0]


def _median_time(fn, device: str, reps: int) -> float:
    import torch

    fn()  # warm-up
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def stats_pass_vs_bandwidth(model, x, y, device: str, reps: int = 10, probe_mb: int = 256) -> dict:
    """The statistics pass of one logging step against reading its tensors once.

    The pass: ``RecordBatch.add`` of every tensor a logging step histograms, ``compute`` and the
    one transfer to the host, as ``watch`` does it. The yardstick: the bytes of those tensors over
    the device's read bandwidth, measured here by summing a ``probe_mb`` buffer. Issue target on
    GPU: the pass within 3x of the yardstick.
    """
    import torch

    from introspect.records.stats import RecordBatch

    tensors = logging_step_tensors(model, x, y)
    n_bytes = sum(t.numel() * t.element_size() for t in tensors)

    def statistics_pass():
        batch = RecordBatch()
        for t in tensors:
            batch.add(t)
        batch.compute().cpu()

    pass_s = _median_time(statistics_pass, device, reps)
    probe = torch.ones(probe_mb * 2**20 // 4, device=device)
    read_s = _median_time(lambda: probe.sum(), device, reps)
    bandwidth = probe.numel() * 4 / read_s
    probe = None  # the buffer goes before the numbers are returned
    once_s = n_bytes / bandwidth
    return {
        "tensors": len(tensors),
        "bytes": n_bytes,
        "pass_s": pass_s,
        "bandwidth_bps": bandwidth,
        "read_once_s": once_s,
        "ratio": pass_s / once_s,
    }


def stats_pass_text(sp: dict) -> str:
    if "error" in sp:
        return f"Statistics pass vs memory bandwidth: failed ({sp['error'].strip().splitlines()[-1]})."
    size = f"{sp['bytes'] / 2**20:.1f} MB" if sp["bytes"] >= 2**20 else f"{sp['bytes'] / 2**10:.1f} KB"
    return (
        f"Statistics pass of one logging step ({sp['tensors']} tensors, {size}: every "
        f"watched output, output gradient, parameter and gradient; add + compute + one transfer): "
        f"{_fmt_added(sp['pass_s']).lstrip('+')}; reading those bytes once at the measured read bandwidth "
        f"({sp['bandwidth_bps'] / 1e9:.0f} GB/s, a sum over a large buffer) takes "
        f"{_fmt_added(sp['read_once_s']).lstrip('+')}: the pass costs {_fmt_ratio(sp['ratio'])} one read "
        "(target on GPU: ≤ 3×; on small tensors per-op dispatch, not bandwidth, sets the time)."
    )


def worker(args) -> int:
    """One model: memory per variant, then the interleaved timing; results as JSON."""
    result: dict = {"model": args._worker, "device": args.device, "variants": {}}
    try:
        _worker_body(args, result)
        status = 0
    except BaseException:  # noqa: BLE001 - reported in the model's section
        result["error"] = traceback.format_exc()
        status = 1
    Path(args._json).write_text(json.dumps(result, indent=1))
    return status


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _preimport(models) -> None:
    """Imports every variant of ``models`` needs, before any fork. Runs no parallel torch op (no
    OpenMP pool may be inherited by a forked child) and does not touch CUDA."""
    import torch
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401

    if "resnet18" in models:
        import torchvision as _  # noqa: F401
    if "gpt2" in models:
        import transformers  # noqa: F401
    # Adam's first construction imports torch._dynamo lazily (~2 s): once here, not in each child.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def _worker_body(args, result: dict) -> None:
    import torch

    _preimport([args._worker])  # already done when forked from the harness

    name, device = args._worker, args.device
    wandb_version = wandb_available()
    keys = [
        k
        for k in VARIANTS
        if (not k.startswith("wandb") or wandb_version)
        and k in args.variant_keys
        and (name in ATTENTION_MODELS or not k.endswith("_no_attn"))
    ]
    result.update(
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        steps=args._steps,
        warmup=args._warmup,
        rounds=args.rounds,
        mem_steps=args._mem_steps,
        align=args._align,
        wandb=wandb_version,
    )
    variants = result["variants"]
    for key in VARIANTS:
        variants[key] = (
            {"status": "ok"}
            if key in keys
            else {"status": "not installed" if key.startswith("wandb") and not wandb_version else "not run"}
        )

    # ---- memory: one process per variant; no parallel torch op has run here yet
    mem_timeout = max(60.0, args.timeout / 4)
    phase = time.perf_counter()
    for key in keys:
        if device == "cuda":
            mem = _in_fresh_process(args, name, key, mem_timeout)
        else:
            pid, fd = _fork_child(lambda k=key: measure_memory(name, k, device, args._mem_steps), mem_timeout)
            mem = _collect_child(pid, fd, mem_timeout)
        variants[key]["mem"] = mem = mem.get("ok", mem)
        if "error" in mem:
            _log(f"memory {key}: failed: {mem['error'].strip().splitlines()[-1]}")
        else:
            _log(f"memory {key}: " + ", ".join(f"{k} {v:.0f}" for k, v in mem.items()))

    _log(f"memory: {time.perf_counter() - phase:.1f} s")
    phase = time.perf_counter()

    # ---- timing: all variants side by side
    from introspect.live import DEFAULT_EVERY

    result["default_every"] = DEFAULT_EVERY
    cadence = {k: VARIANTS[k][1] for k in keys}
    cadence["watch_default"] = DEFAULT_EVERY
    base, x, y, desc = build_model(name, device)
    result["desc"] = desc
    result["params"] = sum(p.numel() for p in base.parameters())
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()

    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp_s:
        tmp = Path(tmp_s)
        wandb_run = None
        runners: dict[str, Runner] = {}
        try:
            for key in keys:
                try:
                    if key.startswith("wandb") and wandb_run is None:
                        wandb_run = _wandb_init(tmp / "wandb")
                    runners[key] = Runner(key, copy.deepcopy(base), x, y, device, tmp / key, wandb_run)
                except Exception:  # noqa: BLE001 - one variant failing must not stop the others
                    variants[key] = {
                        "status": "error",
                        "error": traceback.format_exc(limit=4),
                        "mem": variants[key].get("mem"),
                    }
            if "bare" not in runners:
                raise RuntimeError("the bare variant could not be built")

            chunk = {}
            for key in runners:
                c = cadence.get(key)
                k = args._steps
                if args._align and c and c > 1:
                    k = c * -(-args._steps // c)  # a multiple of the cadence, at least K
                chunk[key] = k
                variants[key]["chunk"] = k

            interleave(runners, variants, chunk, args.rounds, args._warmup, args.quick)
            if device == "cuda":
                _log("host syncs per step ...")
                for key, runner in runners.items():
                    try:
                        variants[key]["syncs"] = count_host_syncs(runner, cadence.get(key))
                    except Exception:  # noqa: BLE001 - the timings stand without it
                        variants[key]["syncs"] = {"error": traceback.format_exc(limit=3)}
        finally:
            for runner in runners.values():
                with contextlib.suppress(Exception):
                    runner.close(finish_watch=False)  # the worker ends soon; the timing is done
            if wandb_run is not None:
                with contextlib.suppress(Exception), contextlib.redirect_stdout(io.StringIO()):
                    wandb_run.finish()

        _log(f"timing: {time.perf_counter() - phase:.1f} s")
        phase = time.perf_counter()
        try:
            result["one_off"] = _time_one_off(base, x, y, device, tmp, reps=1 if args.quick else 3)
        except Exception:  # noqa: BLE001
            result["one_off"] = {"error": traceback.format_exc(limit=4)}
        _log(f"summary+graph one-off: {time.perf_counter() - phase:.1f} s")
        try:
            result["stats_pass"] = stats_pass_vs_bandwidth(
                copy.deepcopy(base), x, y, device, reps=3 if args.quick else 10
            )
        except Exception:  # noqa: BLE001
            result["stats_pass"] = {"error": traceback.format_exc(limit=4)}


def interleave(runners: dict, variants: dict, chunk: dict, rounds: int, warmup: int, quick: bool) -> None:
    """Warm every runner up, then ``rounds`` rounds in which each trains ``chunk[key]`` steps, in
    a new random order per round; each chunk's per-step time is appended to
    ``variants[key]["per_step_s"]``. A runner that raises is dropped (its variant says why)."""

    def timed(key: str, steps: int) -> float:
        runner = runners[key]
        # Let threads left busy by the previous chunk (OpenBLAS workers spin ~0.1 s after
        # numpy's histogram code; wandb's service process) go idle first: their work
        # belongs to the variant that started it, not to the next one.
        time.sleep(QUICK_SETTLE_S if quick else SETTLE_S)
        # One untimed lead-in step (flushed) so each timed chunk starts warm. Any K
        # consecutive steps hold K/c steps of cadence c, so alignment is kept.
        with contextlib.redirect_stdout(io.StringIO()):
            runner.run(QUICK_LEAD_IN_STEPS if quick else LEAD_IN_STEPS)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            runner.run(steps)
        return time.perf_counter() - t0

    for key in list(runners):
        variants[key].setdefault("per_step_s", [])
        try:
            timed(key, warmup)
        except Exception:  # noqa: BLE001
            _drop(runners, variants, key)
    rng = random.Random(20261123)
    for r in range(rounds):
        order = list(runners)
        rng.shuffle(order)
        for key in order:
            if key not in runners:
                continue
            try:
                variants[key]["per_step_s"].append(timed(key, chunk[key]) / chunk[key])
            except Exception:  # noqa: BLE001
                _drop(runners, variants, key)
        _log(
            f"round {r + 1}/{rounds}: "
            + ", ".join(
                f"{k} {variants[k]['per_step_s'][-1] * 1e3:.3g}" for k in runners if variants[k].get("per_step_s")
            )
            + " ms/step"
        )


SYNC_WARNING = "called a synchronizing CUDA operation"
"""The text of the warning ``torch.cuda.set_sync_debug_mode("warn")`` raises (c10's
``warn_or_error_on_sync``, a ``TORCH_WARN``: once per synchronizing call, never deduplicated)."""


def logs_at(key: str, cadence: int | None):
    """Whether variant ``key`` does its logging work on a step (by its 0-based number): step 0
    and every ``cadence``-th after it; wandb's on the steps whose commit ends a ``log_freq``
    period (see ``Runner.step``). None: it never logs after step 0."""
    if not cadence:
        return lambda step: False
    if key.startswith("wandb"):
        return lambda step: (step + 1) % cadence == 0
    return lambda step: step % cadence == 0


def count_host_syncs(runner, cadence: int | None, samples: int = 3) -> dict:
    """Host syncs per step of one CUDA variant, off its logging cadence and on it (median over
    ``samples`` steps of each kind; one logging step for a sparse cadence): the warnings
    ``torch.cuda.set_sync_debug_mode("warn")`` raises while the runner trains one step at a time.
    CUDA only (the mode needs a CUDA context).

    ``warnings.catch_warnings`` is process-wide on this Python, so warnings raised in the autograd
    engine's device thread (hooks that read a gradient on the host) are counted too; those a C++
    backward function raises there are replayed on this thread when ``backward()`` returns.
    """
    import torch

    logging_step = logs_at(runner.key, cadence)
    want = {"off": 0 if cadence == 1 else samples, "logging": 0 if not cadence else samples if cadence == 1 else 1}
    counts: dict[str, list[int]] = {"off": [], "logging": []}
    torch.cuda.synchronize()  # what earlier steps queued is not this count's
    torch.cuda.set_sync_debug_mode("warn")
    try:
        for _ in range(samples + (cadence or 0) + 1):  # enough steps to reach both kinds
            kind = "logging" if logging_step(runner.step_no) else "off"
            with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("always")
                runner.step()
            counts[kind].append(sum(SYNC_WARNING in str(w.message) for w in caught))
            if all(len(counts[k]) >= want[k] for k in counts):
                break
    finally:
        torch.cuda.set_sync_debug_mode("default")
    runner.writer.flush()
    torch.cuda.synchronize()
    return {k: statistics.median(v) if v else None for k, v in counts.items()}


def _drop(runners: dict, variants: dict, key: str) -> None:
    variants[key]["status"] = "error"
    variants[key]["error"] = traceback.format_exc(limit=4)
    runner = runners.pop(key)
    with contextlib.suppress(Exception):
        runner.close()
    _log(f"{key} failed and was dropped:\n{variants[key]['error']}")


def mem_worker(args) -> None:
    try:
        out = {"ok": measure_memory(args._mem, args._variant, args.device, args._mem_steps)}
    except BaseException:  # noqa: BLE001
        out = {"error": traceback.format_exc(limit=6)}
    Path(args._json).write_text(json.dumps(out))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # nothing left to clean up that matters; skip the interpreter's teardown


# ============================================================================ the fault table
FAULT_STEP = 3
"""The step (0-based) each fault is planted at; every run trains one step past it, so a detector
that reports late shows a wrong step."""
FAULT_MODELS = ("fault_cnn", "gpt2")
"""The fault table's models: a CNN of its own (always), and GPT-2 tiny when it is among --models."""
FAULT_DETECTORS = {
    "watch": 'this project: watch(on_nonfinite="warn")',
    "detect_anomaly": "detect_anomaly (check_nan=True)",
    "isfinite_hooks": "naive isfinite hooks",
}
FAULT_COST_VARIANT = {"watch": "watch_default", "detect_anomaly": "detect_anomaly", "isfinite_hooks": "isfinite_hooks"}
"""The timing-table variant whose per-step cost each detector has."""
FAULT_COST_STEPS = {"fault_cnn": (20, 5), "gpt2": (10, 5)}  # (K, rounds) of the in-line cost measurement
QUICK_FAULT_COST_STEPS = {"fault_cnn": (5, 3), "gpt2": (3, 3)}


def _times_nan(out):
    return out * float("nan")


def _overflow(out):
    return out * 1e38 * 1e38  # +-inf wherever out is not 0; no NaN made here


def _sqrt_at_zero(out):
    import torch

    # Forward: sqrt(0) = 0, the output is unchanged. Backward: d sqrt/dx at 0 is inf, so the
    # gradient reaching ``out`` is inf (NaN where the incoming gradient is 0).
    return out + torch.sqrt(out - out.detach())


def _log_of_negative(h):
    import torch

    return torch.log(h)  # NaN wherever h < 0, -inf where it is 0


# fault key -> (what is planted, where it goes: "module" = inside a module's forward, after its
# own computation; "gap" = in the parent's forward between two modules, no module of its own)
FAULTS = {
    "forward_nan": ("forward NaN: a layer's output times NaN", _times_nan, "module"),
    "forward_inf": ("forward Inf: a layer's output overflows (× 1e38 × 1e38)", _overflow, "module"),
    "backward_nan": ("NaN only in backward: + sqrt(x - x.detach()), exactly 0 forward", _sqrt_at_zero, "module"),
    "unwatched": ("NaN in unwatched code: torch.log of a negative, in the parent's forward", _log_of_negative, "gap"),
}


def fault_model(name: str):
    """(model, x, y, sites, description) for the fault table: ``sites`` maps each fault to the
    module it is planted in, or, for the gap, (parent, module before, module after). The model's
    ``gap`` function (on the parent) is the hook point for code between two modules."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)
    if name == "fault_cnn":

        class FaultCNN(nn.Module):
            """Five named layers; ``gap`` runs between fc1 and fc2 in this forward."""

            def __init__(self) -> None:
                super().__init__()
                self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
                self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
                self.pool = nn.AdaptiveAvgPool2d(4)
                self.fc1 = nn.Linear(128, 32)
                self.fc2 = nn.Linear(32, 1)
                self.gap = _identity

            def forward(self, x):
                h = self.pool(F.relu(self.conv2(F.relu(self.conv1(x))))).flatten(1)
                return self.fc2(F.relu(self.gap(self.fc1(h))))

        model = FaultCNN()
        x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 2, (16, 1)).float()
        sites = {"forward_nan": "conv2", "forward_inf": "conv1", "backward_nan": "fc1", "unwatched": ("", "fc1", "fc2")}
        desc = "a CNN of five named layers (conv1, conv2, pool, fc1, fc2), batch 16 of 3x16x16, BCEWithLogits, Adam"
        return model, x, y, sites, desc
    if name == "gpt2":
        model, x, _, desc = build_model("gpt2", "cpu")
        mlp = model.transformer.h[1].mlp
        mlp.gap = _identity

        def mlp_forward(hidden_states):
            # GPT2MLP.forward, with the parent's own code between c_fc and act.
            return mlp.dropout(mlp.c_proj(mlp.act(mlp.gap(mlp.c_fc(hidden_states)))))

        mlp.forward = mlp_forward
        sites = {
            "forward_nan": "transformer.h.1.mlp.c_fc",
            "forward_inf": "transformer.h.0.mlp.c_proj",
            "backward_nan": "transformer.h.0.attn.c_attn",
            "unwatched": ("transformer.h.1.mlp", "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.act"),
        }
        return model, x, None, sites, desc
    raise ValueError(f"unknown fault model {name!r}; choose from {', '.join(FAULT_MODELS)}")


def _identity(h):
    return h


def plant(model, fault: str, site, clock: dict) -> None:
    """Plant ``fault`` in ``model`` at ``site``: it runs only while ``clock["step"]`` is
    FAULT_STEP. A module fault wraps the module's own forward (instance attribute), so every
    hook, whoever registered it and in whatever order, sees the faulty output as the module's."""
    _, fn, where = FAULTS[fault]

    def _planted_call(h):  # the name the detect_anomaly judge looks for in forward tracebacks
        return fn(h) if clock["step"] == FAULT_STEP else h

    if where == "gap":
        model.get_submodule(site[0]).gap = _planted_call
        return
    module = model.get_submodule(site)
    forward = module.forward

    def planted_forward(*args, **kwargs):
        return _planted_call(forward(*args, **kwargs))

    module.forward = planted_forward


def _expected(fault: str, site) -> str:
    if FAULTS[fault][2] == "gap":
        return f"between `{site[1]}` and `{site[2]}`"
    return f"`{site}` ({'backward' if fault == 'backward_nan' else 'forward'})"


def _judge(fault: str, site, found: dict) -> str:
    """right / wrong / missed, from what a detector ``found``: ``named``, the module it blamed
    (None: it found nothing), ``step``, and where it says so, ``between`` (the two modules code
    outside any module lies between) or ``through_plant`` (its forward traceback runs through the
    planted code: detect_anomaly names no module). The unwatched fault is right when both its
    neighbours are named, or the parent whose forward holds it ("" is the root)."""
    if found.get("named") is None:
        return "missed"
    if found.get("step") != FAULT_STEP:
        return "wrong"
    if "through_plant" in found:
        return "right" if found["through_plant"] else "wrong"
    if FAULTS[fault][2] == "gap":
        parent, before, after = site
        ok = found.get("between") == (before, after) or found["named"] == parent
    else:
        ok = found["named"] == site
    return "right" if ok else "wrong"


def _fault_steps(model, x, y, clock: dict, steps: int, around_step=contextlib.nullcontext) -> None:
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(steps):
        clock["step"] = step
        with around_step():
            loss = train_loss(model, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()


def detect_with_watch(model, x, y, fault, site, clock, tmp: Path) -> dict:
    """This project's answer: the first ``nonfinite`` alert of ``watch(on_nonfinite="warn")``."""
    from introspect import watch

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the NonFiniteWarning; the alert is read below
        with watch(model, str(tmp), on_nonfinite="warn", summary=False, graph=False) as w:
            _fault_steps(model, x, y, clock, FAULT_STEP + 2)
    alerts = [a for a in w.alerts if a.kind == "nonfinite"]
    if not alerts:
        return {"named": None, "said": "nothing", "step": None}
    a = alerts[0]
    module = a.where.split("/")[0]
    found = {"named": module, "said": f"`{module}` ({a.phase}), step {a.step}", "step": a.step}
    between = re.search(r"between (\S+) and (\S+?)[ ;(]", a.message + " ")
    if between:
        found.update(between=(between[1], between[2]), said=f"between `{between[1]}` and `{between[2]}`, step {a.step}")
    return found


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def detect_with_anomaly(model, x, y, fault, site, clock, tmp: Path) -> dict:
    """detect_anomaly's answer: the backward function its RuntimeError names and the innermost
    frame of the forward traceback it warns with. It names no module; it is judged right when
    that traceback runs through the planted code (the op it blames was made inside it)."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _fault_steps(
                model,
                x,
                y,
                clock,
                FAULT_STEP + 2,
                around_step=lambda: torch.autograd.set_detect_anomaly(True, check_nan=True),
            )
        except RuntimeError as e:
            error = str(e)
        else:
            return {"named": None, "said": "nothing (no error raised)", "step": None}
    node = re.search(r"Function '(\w+)'", error)
    node = node[1] if node else error.splitlines()[0][:80]
    trace = next((str(w.message) for w in caught if "Traceback of forward call" in str(w.message)), "")
    frames = _FRAME.findall(trace)
    said = f"`{node}`, step {clock['step']}"
    if frames:
        path, line, func = frames[-1]
        said += f"; forward at {Path(path).name}:{line} in {func}"
    return {
        "named": node,
        "said": said,
        "step": clock["step"],
        "through_plant": any(func == "_planted_call" for _, _, func in frames),
    }


def detect_with_isfinite(model, x, y, fault, site, clock, tmp: Path) -> dict:
    """The naive hooks' answer: the first module whose output, or output gradient, was flagged."""
    hooks = IsfiniteHooks(model)
    steps = iter(range(FAULT_STEP + 2))

    def step_counter():
        hooks.step = next(steps)
        return contextlib.nullcontext()

    try:
        _fault_steps(model, x, y, clock, FAULT_STEP + 2, around_step=step_counter)
    finally:
        hooks.remove()
    if hooks.first is None:
        return {"named": None, "said": "nothing", "step": None}
    name, phase, step = hooks.first
    what = "output" if phase == "forward" else "output gradient"
    return {"named": name, "said": f"`{name or '(root)'}` {what}, step {step}", "step": step}


DETECT = {"watch": detect_with_watch, "detect_anomaly": detect_with_anomaly, "isfinite_hooks": detect_with_isfinite}


def run_faults(models, quick: bool, timing: list[dict] | None = None) -> list[dict]:
    """Every fault on every model under every detector (a fresh seeded model each time), plus
    each detector's per-step cost on that model: from ``timing`` (this run's timing results)
    when it holds the model, else measured in-line here."""
    import torch

    # One thread: these tensors are tiny, and two OpenMP threads on a shared 2-core machine spin
    # against each other (a 3 ms step of the fault CNN took 230 ms so).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_faults(models, quick, timing)
    finally:
        torch.set_num_threads(threads)


def _run_faults(models, quick: bool, timing: list[dict] | None) -> list[dict]:
    timed = {r.get("model"): {row["key"]: row for row in summarize(r) if row.get("ratio")} for r in timing or []}
    out = []
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp_s:
        tmp = Path(tmp_s)
        for name in models:
            t0 = time.perf_counter()
            entry: dict = {"model": name, "cells": {}}
            try:
                _, _, _, sites, entry["desc"] = fault_model(name)
                entry["expected"] = {f: _expected(f, sites[f]) for f in FAULTS}
                for fault in FAULTS:
                    for det, fn in DETECT.items():
                        model, x, y, sites, _ = fault_model(name)
                        clock = {"step": 0}
                        plant(model, fault, sites[fault], clock)
                        try:
                            found = fn(model, x, y, fault, sites[fault], clock, tmp / f"{name}-{fault}-{det}")
                            found["verdict"] = _judge(fault, sites[fault], found)
                        except Exception as e:  # noqa: BLE001 - one cell failing must not stop the table
                            found = {"said": f"error: {type(e).__name__}: {e}"[:160], "verdict": "error"}
                        entry["cells"][f"{fault}/{det}"] = found
                entry["cost"] = _fault_costs(name, quick, timed.get(name), tmp)
            except Exception:  # noqa: BLE001
                entry["error"] = traceback.format_exc(limit=4)
            entry["elapsed_s"] = time.perf_counter() - t0
            _log(f"faults {name}: {entry['elapsed_s']:.1f} s")
            out.append(entry)
    return out


def _fault_costs(name: str, quick: bool, timed_rows: dict | None, tmp: Path) -> dict:
    """detector -> {"ratio", "source"}: this run's timing table when it timed ``name``, else a
    short interleaved measurement of the same Runner variants on the (unplanted) fault model."""
    if timed_rows and all(v in timed_rows for v in FAULT_COST_VARIANT.values()):
        return {d: {"ratio": timed_rows[v]["ratio"], "source": "timing table"} for d, v in FAULT_COST_VARIANT.items()}
    steps, rounds = (QUICK_FAULT_COST_STEPS if quick else FAULT_COST_STEPS)[name]
    keys = ["bare", *FAULT_COST_VARIANT.values()]
    variants = {k: {"status": "ok"} for k in keys}
    # A fresh (seeded, identical) model each, not a deepcopy: GPT-2's patched MLP forward is a
    # closure over its own modules, which a copy would keep calling.
    runners = {}
    for k in keys:
        model, x, y, _, _ = fault_model(name)
        runners[k] = Runner(k, model, x, y, "cpu", tmp / f"cost-{name}-{k}")
    try:
        interleave(runners, variants, {k: steps for k in keys}, rounds, warmup=2, quick=quick)
    finally:
        for runner in runners.values():  # (in the caller's process, which goes on: a full close)
            with contextlib.suppress(Exception):
                runner.close()
    rows = {r["key"]: r for r in summarize({"variants": variants}) if r.get("ratio")}
    source = f"in-line: {_n(rounds, 'round')} of {_n(steps, 'step')}, CPU, 1 thread"
    return {d: {"ratio": rows[v]["ratio"], "source": source} for d, v in FAULT_COST_VARIANT.items() if v in rows}


def faults_section(entries: list[dict], timing: list[dict] | None = None) -> str:
    """The markdown of the fault table: one table per model, a cost row under each."""
    lines = [
        "## Which detector finds which fault",
        "",
        f"Each fault is planted at step {FAULT_STEP} (counting from 0) of a fresh, seeded model trained with "
        f"Adam for {FAULT_STEP + 2} steps, once per detector: this project (`watch(model, logdir, "
        'on_nonfinite="warn", summary=False, graph=False)`, its first `nonfinite` alert), '
        "`torch.autograd.set_detect_anomaly(True, check_nan=True)` around each step (the backward "
        "function its RuntimeError names, and the innermost frame of the forward traceback it "
        "prints; judged right when that traceback runs through the planted code, since it names "
        "no module), and the naive hooks (`isfinite(t).all()` read on the host for every module "
        "output and output gradient; the first flagged). A module fault is planted inside the "
        "module's own forward, after its computation; the unwatched fault is a functional call in "
        "the parent's forward, between two modules. right: the planted module (for the unwatched "
        "fault: both modules it lies between, or its parent) at the planted step; wrong: another "
        "module or step; missed: nothing reported.",
        "",
    ]
    for e in entries:
        lines += [f"### {e['model']}: {e.get('desc', '')}", ""]
        if e.get("error"):
            lines += ["**Failed:**", "", "```", e["error"].strip()[-2000:], "```", ""]
            continue
        lines += [
            "| fault | planted at | " + " | ".join(FAULT_DETECTORS.values()) + " |",
            "| --- | --- |" + " --- |" * len(FAULT_DETECTORS),
        ]
        for fault, (label, _, _) in FAULTS.items():
            cells = [e["cells"].get(f"{fault}/{d}", {}) for d in FAULT_DETECTORS]
            lines.append(
                f"| {label} | {e['expected'][fault]} | "
                + " | ".join(f"{c.get('said', '—')}: **{c.get('verdict', '—')}**" for c in cells)
                + " |"
            )
        cost = e.get("cost") or {}
        lines.append(
            "| cost per step (ratio to bare) | | "
            + " | ".join(
                f"{_fmt_ratio(cost[d]['ratio'])} ({cost[d]['source']})" if d in cost else "—" for d in FAULT_DETECTORS
            )
            + " |"
        )
        lines.append("")
    timed = [(r.get("model"), {row["key"]: row for row in summarize(r) if row.get("ratio")}) for r in timing or []]
    timed = [(m, rows) for m, rows in timed if rows]
    if timed:
        lines += [
            "Per-step cost of each detector in this run's timing tables (ratio to bare; this project "
            "at its default cadence):",
            "",
            "| detector | " + " | ".join(m for m, _ in timed) + " |",
            "| --- |" + " ---: |" * len(timed),
        ]
        for d, v in FAULT_COST_VARIANT.items():
            lines.append(
                f"| {FAULT_DETECTORS[d]} | "
                + " | ".join(_fmt_ratio(rows[v]["ratio"]) if v in rows else "—" for _, rows in timed)
                + " |"
            )
        lines.append("")
    return "\n".join(lines)


# ============================================================================ the harness
def run_model(args, model: str) -> dict:
    """Run one model's worker in a process of its own; its results, or an error with its log's tail.

    The worker is forked from this process, which has imported torch and tensorboard (and run no
    torch op): a fresh process for each model without paying ~7 s of imports each time. It gets a
    session of its own, so a timeout or Ctrl-C ends its forked children too.
    """
    quick = args.quick
    wargs = argparse.Namespace(**vars(args))
    wargs._worker = model
    wargs._steps = args.steps or (QUICK_STEPS if quick else FULL_STEPS)[model]
    wargs._warmup = (QUICK_WARMUP if quick else FULL_WARMUP)[model]
    wargs._mem_steps = QUICK_MEM_STEPS if quick else FULL_MEM_STEPS
    wargs._align = 0 if quick else 1
    tail: collections.deque[str] = collections.deque(maxlen=25)
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        wargs._json = str(Path(tmp) / "result.json")
        t0 = time.perf_counter()
        sys.stdout.flush()
        sys.stderr.flush()
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                os.setsid()
                os.close(read_fd)
                log = os.open(Path(tmp) / "stdout.log", os.O_WRONLY | os.O_CREAT, 0o644)
                os.dup2(log, 1)  # torchinfo summaries and the like
                os.dup2(write_fd, 2)
                status = worker(wargs)
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(status)
        os.close(write_fd)
        status = _follow(pid, read_fd, model, tail, args.timeout)
        elapsed = time.perf_counter() - t0
        out = Path(wargs._json)
        result = json.loads(out.read_text()) if out.exists() else {}
    result.setdefault("model", model)
    result["elapsed_s"] = elapsed
    if status != 0 and "error" not in result:
        result["error"] = f"worker exited with status {status}\n" + "\n".join(tail)
    return result


def _follow(pid: int, read_fd: int, model: str, tail: collections.deque, timeout_s: float) -> int:
    """Echo the worker's stderr (prefixed) until it exits or times out; its exit code. No thread,
    so the next fork happens in a process with one thread only."""
    import select

    deadline = time.monotonic() + timeout_s
    pending = b""

    def echo(chunk: bytes, final: bool = False) -> None:
        nonlocal pending
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if final and pending:
            lines, pending = lines + [pending], b""
        for raw in lines:
            line = raw.decode(errors="replace")
            tail.append(line)
            print(f"  [{model}] {line}", file=sys.stderr, flush=True)

    status = None
    try:
        while status is None:
            ready, _, _ = select.select([read_fd], [], [], 0.5)
            if ready:
                chunk = os.read(read_fd, 65536)
                if chunk:
                    echo(chunk)
                    continue
            done, wait_status = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(wait_status)
            elif time.monotonic() > deadline:
                _kill_group(pid)
                tail.append(f"killed after the {timeout_s:.0f} s timeout (--timeout)")
                status = -signal.SIGKILL
            elif ready:  # EOF while still running (stderr closed): just wait
                time.sleep(0.5)
        # What is left in the pipe; a child that outlived the worker may hold it open: no EOF wait.
        while select.select([read_fd], [], [], 0)[0]:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            echo(chunk)
        echo(b"", final=True)
    except BaseException:
        _kill_group(pid)
        raise
    finally:
        os.close(read_fd)
    return status


def _kill_group(pid: int) -> None:
    """End the worker and everything in its process group (its forked memory children)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def summarize(result: dict) -> list[dict]:
    """Rows of a model's table: ms/step, paired ratios and differences to bare, memory."""
    variants = result.get("variants", {})
    bare = variants.get("bare", {})
    bare_t = bare.get("per_step_s") or []
    bare_mem = bare.get("mem") or {}
    mem_key = "cuda_mb" if result.get("device") == "cuda" else "rss_mb"
    rows = []
    for key, (label, _) in VARIANTS.items():
        v = variants.get(key, {"status": "not run"})
        if key == "watch_default" and "default_every" in result:
            label = f"watch(), default cadence (every={result['default_every']})"
        row = {"key": key, "label": label, "status": v.get("status", "not run"), "chunk": v.get("chunk")}
        times = v.get("per_step_s") or []
        if row["status"] == "ok" and times and bare_t:
            n = min(len(times), len(bare_t))
            ratios = [times[i] / bare_t[i] for i in range(n)]
            diffs = [times[i] - bare_t[i] for i in range(n)]
            row.update(
                ms=statistics.median(times) * 1e3,
                ratio=statistics.median(ratios),
                ratio_lo=min(ratios),
                ratio_hi=max(ratios),
                added_s=statistics.median(diffs),
            )
        elif row["status"] == "ok":
            row["status"] = "no timing"
        mem = v.get("mem") or {}
        if mem_key in mem and mem_key in bare_mem:
            row.update(
                mem_mb=mem[mem_key],
                mem_ratio=mem[mem_key] / bare_mem[mem_key],
                mem_added_mb=mem[mem_key] - bare_mem[mem_key],
            )
        elif "error" in mem:
            row["mem_error"] = mem["error"].strip().splitlines()[-1][:120]
        if v.get("error"):
            row["error"] = v["error"].strip().splitlines()[-1][:160]
        if v.get("syncs"):
            row["syncs"] = v["syncs"]
        rows.append(row)
    return rows


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"


def _fmt_ratio(r: float) -> str:
    return f"{r:.2f}×" if r < 10 else f"{r:.1f}×" if r < 100 else f"{r:.0f}×"


def _fmt_added(seconds: float) -> str:
    if abs(seconds) < 1e-3:
        return f"{seconds * 1e6:+.0f} µs"
    ms = seconds * 1e3
    return f"{ms:+.2f} ms" if abs(ms) < 10 else f"{ms:+.1f} ms" if abs(ms) < 100 else f"{ms:+.0f} ms"


SYNCS_NOTE = (
    'Host syncs per step: the warnings `torch.cuda.set_sync_debug_mode("warn")` raised during '
    "one step, median over 3 steps off the variant's logging cadence / on it (one step for "
    "sparse cadences; — where the variant has no such step). Issue 15's target: at most one per "
    "step, and only with the non-finite check on."
)


def _fmt_syncs(syncs: dict | None) -> str:
    if not syncs:
        return "—"
    if "error" in syncs:
        return f"error: {syncs['error'].strip().splitlines()[-1][:80]}"
    return " / ".join("—" if syncs.get(k) is None else f"{syncs[k]:g}" for k in ("off", "logging"))


def _model_title(result: dict) -> str:
    name = result.get("model", "?")
    if name == "resnet18" and result.get("device") == "cuda":
        return "resnet18 (resnet50 on CUDA)"
    return name


def model_section(result: dict, device: str) -> str:
    lines = [f"## {_model_title(result)}", ""]
    if result.get("desc"):
        lines.append(f"{result['desc']}; {result.get('params', 0):,} parameters.")
    steps = result.get("steps")
    if steps:
        longer = sorted(
            {v["chunk"] for v in result.get("variants", {}).values() if v.get("chunk") and v["chunk"] != steps}
        )
        extra = f" ({', '.join(map(str, longer))} for variants whose cadence needs it)" if longer else ""
        lines.append(
            f"Chunks of {_n(steps, 'step')}{extra}, {_n(result.get('rounds', 0), 'round')}, "
            f"{_n(result.get('warmup', 0), 'warm-up step')} per variant; "
            f"the worker took {result.get('elapsed_s', 0):.0f} s."
        )
    lines.append("")
    if result.get("error"):
        lines += ["**This model's run failed:**", "", "```", result["error"].strip()[-3000:], "```", ""]
    rows = summarize(result)
    if any(r.get("ms") is not None or r.get("mem_ratio") is not None for r in rows):
        mem_head = "peak GPU memory ratio" if device == "cuda" else "peak memory ratio (RSS)"
        # Host syncs are counted on CUDA only (set_sync_debug_mode needs a CUDA context).
        syncs = device == "cuda"
        lines += [
            f"| variant | ms/step (median) | ratio to bare (min–max over rounds) | added per step | {mem_head} |"
            + (" host syncs per step (off-cadence / logging) |" if syncs else ""),
            "| --- | ---: | ---: | ---: | ---: |" + (" ---: |" if syncs else ""),
        ]
        for r in rows:
            if r["status"] == "not run":  # left out with --variants
                continue
            if r.get("ms") is not None:
                ms = _fmt_ms(r["ms"])
                if r["key"] == "bare":
                    ratio, added = "1.00×", "—"
                else:
                    ratio = f"{_fmt_ratio(r['ratio'])} ({r['ratio_lo']:.2f}–{r['ratio_hi']:.2f})"
                    added = _fmt_added(r["added_s"])
            else:
                ms = r["status"] if r["status"] != "error" else f"error: {r.get('error', '')}"
                ratio = added = "—"
            if r.get("mem_ratio") is not None:
                mem = f"{r['mem_ratio']:.2f}× ({r['mem_mb']:.0f} MB"
                mem += ")" if r["key"] == "bare" else f", {r['mem_added_mb']:+.0f} MB)"
            elif r.get("mem_error"):
                mem = f"error: {r['mem_error']}"
            else:
                mem = "—"
            lines.append(
                f"| {r['label']} | {ms} | {ratio} | {added} | {mem} |"
                + (f" {_fmt_syncs(r.get('syncs'))} |" if syncs else "")
            )
        lines.append("")
        if syncs:
            lines += [SYNCS_NOTE, ""]
    one = result.get("one_off")
    if one:
        if "error" in one:
            lines.append(
                f"One-time cost of summary=True, graph=True: failed ({one['error'].strip().splitlines()[-1]})."
            )
        else:
            note = f" Warnings: {'; '.join(one['warnings'])}." if one.get("warnings") else ""
            lines.append(
                f"One-time cost of summary=True, graph=True on the first batch: {_fmt_added(one['added_s'])} "
                f"(first batch under watch {one['on_s'] * 1e3:.0f} ms with both, {one['off_s'] * 1e3:.0f} ms "
                f"without; not part of the per-step numbers above).{note}"
            )
        lines.append("")
    if result.get("stats_pass"):
        lines += [stats_pass_text(result["stats_pass"]), ""]
    return "\n".join(lines)


def machine_info(device: str) -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    cores = os.cpu_count()
    with contextlib.suppress(AttributeError):
        usable = len(os.sched_getaffinity(0))
        if usable != cores:
            cores = f"{cores} ({usable} usable)"

    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return (
        f"{cpu}, {cores} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}; "
        f"torch {version('torch')}, torchvision {version('torchvision')}, tensorboard {version('tensorboard')}, "
        f"wandb {version('wandb')}; device: {device}"
    )


def method_text(quick: bool) -> str:
    """The method, in four sentences, as this run applied it."""
    chunks = (
        "chunks are not aligned to logging cadences in --quick"
        if quick
        else "K a multiple of the variant's logging cadence, so every chunk holds the same number of logging steps"
    )
    pause = QUICK_SETTLE_S if quick else SETTLE_S
    lead = QUICK_LEAD_IN_STEPS if quick else LEAD_IN_STEPS
    lead_in = (
        ", and an untimed lead-in step warms the variant up again"
        if lead == 1
        else f", and {lead} untimed lead-in steps warm the variant up again"
        if lead
        else ""
    )
    return (
        "Each model runs in a process of its own (forked from the harness, which has imported torch "
        "but run nothing) that builds every variant side by side (own model copy, Adam optimizer and "
        "SummaryWriter; synthetic data made once), warms each up, then runs R "
        f"rounds in which every variant trains a chunk of K steps in a new random order ({chunks}). A "
        "chunk's time includes `writer.flush()` at its end, since the writer thread's work belongs to "
        f"the variant that queued it; an untimed {pause:g} s pause before each chunk lets threads the "
        f"previous one left spinning go idle{lead_in}. Reported: each variant's median ms/step over rounds, "
        "and the median over rounds of its ratio to (and difference from) the bare loop of the same "
        "round, which cancels most of the machine's drift; `watch` runs with `summary=False, "
        "graph=False` (their one-time cost has its own line), wandb offline, committing its hooks' "
        "histograms on the steps they log. Peak memory comes from a separate short process per variant "
        "that trains only that variant for a few steps (on CPU a forked child, peak RSS from "
        "`ru_maxrss`, which includes the interpreter and libraries; on CUDA a fresh process and "
        "`torch.cuda.max_memory_allocated`), relative to bare."
    )


# Alternatives in warm colours, watch in greens and blues, wandb in purples.
COLORS = {
    "tb_every1": "#d62728",
    "tb_every100": "#ff9896",
    "watch_default": "#2ca02c",
    "watch_every1": "#1f77b4",
    "watch_check": "#98df8a",
    "watch_hooks": "#aec7e8",
    "wandb_1": "#9467bd",
    "wandb_100": "#c5b0d5",
    "detect_anomaly": "#8c564b",
    "isfinite_hooks": "#e377c2",  # the other NaN detectors: browns/pinks
}


def write_plot(results: list[dict], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001
        return f"no plot: matplotlib failed ({e})"
    table = {res.get("model", "?"): {r["key"]: r for r in summarize(res) if r.get("ratio")} for res in results}
    labels = {res.get("model", "?"): _model_title(res) for res in results}
    keys = [k for k in VARIANTS if k != "bare" and any(k in rows for rows in table.values())]
    models = [m for m, rows in table.items() if rows]
    if not keys or not models:
        return "no plot: no timings"
    ratios = [table[m][k]["ratio"] for m in models for k in keys if k in table[m]]
    fig, ax = plt.subplots(figsize=(max(7.0, 2.2 * len(models) + 3), 5))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        xs = [j + (i - (len(keys) - 1) / 2) * width for j, m in enumerate(models) if key in table[m]]
        ys = [table[m][key]["ratio"] for m in models if key in table[m]]
        label = next(table[m][key]["label"] for m in models if key in table[m])
        ax.bar(xs, ys, width * 0.95, label=label, color=COLORS.get(key, "tab:gray"))
        for xv, yv in zip(xs, ys):
            ax.annotate(
                f"{yv:.2f}" if yv < 10 else f"{yv:.1f}",
                (xv, yv),
                xytext=(0, 2),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=6,
                rotation=90,
            )
    ax.axhline(1.0, color="black", linewidth=0.8)
    if max(ratios) / max(min(ratios), 1e-9) > 5:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        from matplotlib.ticker import FuncFormatter

        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.margins(y=0.12)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([labels.get(m, m) for m in models])
    ax.set_ylabel("time per step / bare loop (median of rounds)")
    ax.set_title("Per-step cost of logging, relative to the bare training loop")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _loadavg() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def resolve_device(requested: str) -> tuple[str, str | None]:
    if requested != "cuda":
        return "cpu", None
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True
    )
    if probe.stdout.strip() == "True":
        return "cuda", None
    return "cpu", "--device cuda was asked for but CUDA is not available here; ran on CPU instead."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Per-step cost of introspect.watch() next to bare training, the TensorBoard "
        "tutorial way (add_histogram of every parameter), wandb.watch (when installed), detect_anomaly and "
        "naive isfinite hooks; then a table of which NaN/Inf detector names which planted fault.",
    )
    p.add_argument("--quick", action="store_true", help="few rounds and short chunks: a smoke run (< 2 min on 2 cores)")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="default: cpu (cuda falls back to cpu when unavailable)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="markdown report; the plot is written beside it as .png (default: docs/benchmarks.md; "
        "with --faults, printed only unless --out is given)",
    )
    p.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated subset of {','.join(MODELS)} "
        "(the fault table runs on a five-layer CNN of its own, and on gpt2 when it is among them)",
    )
    faults = p.add_mutually_exclusive_group()
    faults.add_argument(
        "--faults",
        action="store_true",
        help="only the fault table: which NaN/Inf detector names which planted fault, at what cost (measured in-line)",
    )
    faults.add_argument("--skip-faults", action="store_true", help="timing tables only, no fault table")
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"rounds per model (default {FULL_ROUNDS}; {QUICK_ROUNDS} with --quick)",
    )
    p.add_argument("--steps", type=int, default=None, help="steps per chunk, K (default per model)")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)} (bare is always run)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per model before its worker is killed (default 300 with --quick, 3600 otherwise)",
    )
    hidden = argparse.SUPPRESS
    p.add_argument("--_worker", help=hidden)
    p.add_argument("--_mem", help=hidden)
    p.add_argument("--_variant", help=hidden)
    p.add_argument("--_steps", type=int, help=hidden)
    p.add_argument("--_warmup", type=int, help=hidden)
    p.add_argument("--_mem-steps", dest="_mem_steps", type=int, help=hidden)
    p.add_argument("--_align", type=int, default=1, help=hidden)
    p.add_argument("--_json", help=hidden)
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = QUICK_ROUNDS if args.quick else FULL_ROUNDS
    if args.timeout is None:
        args.timeout = 300.0 if args.quick else 3600.0
    args.variant_keys = ["bare"] + [v.strip() for v in args.variants.split(",") if v.strip() and v.strip() != "bare"]
    unknown = [v for v in args.variant_keys if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {','.join(VARIANTS)}")
    if args.rounds < 1 or (args.steps is not None and args.steps < 1):
        p.error("--rounds and --steps must be >= 1")
    return args


GENERATED_BELOW = "<!-- scripts/bench writes everything below this line; the text above it is kept. -->"


def kept_head(out: Path) -> str:
    """The hand-written text above ``GENERATED_BELOW`` in an existing report (docs/benchmarks.md
    opens with the prose the README links to), marker included; "" when there is none."""
    if not out.is_file():
        return ""
    text = out.read_text()
    end = text.find(GENERATED_BELOW)
    return "" if end < 0 else text[: end + len(GENERATED_BELOW)] + "\n\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        return worker(args)
    if args._mem:
        return mem_worker(args)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        print(f"error: unknown model(s) {unknown}; choose from {','.join(MODELS)}", file=sys.stderr)
        return 2
    fault_models = [] if args.skip_faults else [m for m in FAULT_MODELS if m == "fault_cnn" or m in models]
    device, device_note = resolve_device("cpu" if args.faults else args.device)
    if device_note:
        print(f"warning: {device_note}", file=sys.stderr)
    args.device = device
    out = Path(args.out or "docs/benchmarks.md")
    if not out.is_absolute():
        out = Path(os.environ.get("INTROSPECT_BENCH_CWD", os.getcwd())) / out
    png = out.with_suffix(".png")

    # What every worker needs, set and imported once here: each worker is forked from this process.
    os.environ.update(
        MPLBACKEND="Agg", WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONSOLE="off", WANDB_DISABLE_GIT="true"
    )
    _preimport(fault_models if args.faults else models)

    started = datetime.datetime.now().astimezone()
    load_before = _loadavg()
    t0 = time.perf_counter()
    results = []
    for model in [] if args.faults else models:
        print(f"== {model} ({device}) ...", file=sys.stderr, flush=True)
        try:
            results.append(run_model(args, model))
        except Exception:  # noqa: BLE001 - the harness itself must not stop on one model
            results.append({"model": model, "error": traceback.format_exc()})
    fault_text = ""
    if fault_models:
        # Last, in this process: no worker is forked after the torch ops these run.
        print(f"== faults ({', '.join(fault_models)}, cpu) ...", file=sys.stderr, flush=True)
        fault_text = faults_section(run_faults(fault_models, args.quick, results), results)
    total = time.perf_counter() - t0

    invocation = "scripts/bench " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else "scripts/bench"
    title = (
        "# Fault table: which NaN/Inf detector names which fault"
        if args.faults
        else "# Benchmarks: what `watch` costs per training step"
    )
    header = [
        title,
        "",
        f"Date: {started:%Y-%m-%d %H:%M %Z}. Command: `{invocation}` ({total:.0f} s in all).",
        "",
        f"Machine: {machine_info(device)}. Load average (1 min) before the run {load_before}, "
        f"after it {_loadavg()}: other work on the machine makes every number noisier.",
        "",
    ]
    if device_note:
        header += [f"Note: {device_note}", ""]
    if args.quick:
        header += [
            "**A `--quick` run**: few rounds of short chunks, chunks not aligned to the "
            "logging cadence (sparse cadences show their off-cadence cost only). Rough "
            "numbers for checking the script, not for quoting.",
            "",
        ]
    if args.faults:
        text = "\n".join(header) + "\n" + fault_text
        print()
        print(fault_text)
        if args.out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text.rstrip() + "\n")
            print(f"Wrote {out} in {total:.0f} s.")
        return 0
    header += [
        f"Method: {method_text(args.quick)}",
        "",
        "Ratio: time per step over the bare loop's in the same round (median over rounds; "
        "range in brackets). Added per step: the difference, median over rounds.",
        "",
    ]
    sections = [model_section(r, device) for r in results] + ([fault_text] if fault_text else [])
    plot_note = write_plot(results, png)
    plot_line = (
        f"Plot: ![ratio to bare per variant and model]({png.name})" if plot_note is None else f"Plot: {plot_note}."
    )
    text = "\n".join(header) + "\n" + plot_line + "\n\n" + "\n".join(sections)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(kept_head(out) + text.rstrip() + "\n")

    print()
    print("\n".join(sections))
    print(f"Wrote {out}" + (f" and {png}" if plot_note is None else f" ({plot_note})") + f" in {total:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
