"""Per-step cost of ``watch`` against the module count: MLP stacks of 51, 201 and 801 modules.

    PYTHONPATH=$PWD python -m benchmarks.scale_steps [--modules 201 801] [--rounds 7] [--chunk 50]

Each model is trained bare and watched (default cadence; ``every=1``), from copies of one
initialisation, in interleaved chunks of ``--chunk`` steps (a new random order every round; each
chunk holds its share of logging steps and a writer flush). Printed per variant: the median over
rounds of the per-step time and of the ratio to bare in the same round; for ``every=1`` the
median logging step over bare's median step. Also the statistics pass of one logging step
against one read of the same bytes. A measurement script, not a test: the numbers are noisy.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from introspect import watch


def mlp(modules: int, width: int = 32) -> nn.Sequential:
    """``(modules - 1) / 2`` blocks of (Linear width->width, ReLU): ``modules`` modules with the root."""
    blocks = (modules - 1) // 2
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


class Trainer:
    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model, self.x, self.y = model, x, y
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        self.times: list[float] = []

    def step(self) -> float:
        t0 = time.perf_counter()
        loss = nn.functional.mse_loss(self.model(self.x), self.y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t0


def run(modules: int, rounds: int, chunk: int, batch: int, log_chunk: int) -> None:
    torch.manual_seed(0)
    base = mlp(modules)
    x, y = torch.randn(batch, 32), torch.randn(batch, 32)
    tmp = tempfile.TemporaryDirectory()
    variants: dict[str, tuple[Trainer, object]] = {}
    for key, options in {"bare": None, "default": {}, "every=1": {"every": 1}}.items():
        model = mlp(modules)
        model.load_state_dict(base.state_dict())
        trainer = Trainer(model, x, y)
        w = None
        if options is not None:
            w = watch(model, f"{tmp.name}/{key}", summary=False, graph=False, **options)
            w.__enter__()
        variants[key] = (trainer, w)
    per_step: dict[str, list[float]] = {k: [] for k in variants}
    ratios: dict[str, list[float]] = {k: [] for k in variants}
    logging_steps: list[float] = []
    bare_steps: list[float] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for trainer, _ in variants.values():  # warm-up (and the first, always logging, step)
            for _ in range(5):
                trainer.step()
        for _ in range(rounds):
            order = list(variants)
            random.shuffle(order)
            this: dict[str, float] = {}
            for key in order:
                trainer, w = variants[key]
                n = log_chunk if key == "every=1" else chunk
                t0 = time.perf_counter()
                steps = [trainer.step() for _ in range(n)]
                if w is not None:
                    w.writer.flush()
                this[key] = (time.perf_counter() - t0) / n
                if key == "every=1":
                    logging_steps += steps
                if key == "bare":
                    bare_steps += steps
            for key in variants:
                per_step[key].append(this[key])
                ratios[key].append(this[key] / this["bare"])
    for _, w in variants.values():
        if w is not None:
            w.close()  # type: ignore[attr-defined]
    bare_ms = statistics.median(per_step["bare"]) * 1e3
    print(f"MLP {modules} modules, batch {batch}: bare {bare_ms:.2f} ms/step")
    for key in variants:
        if key == "bare":
            continue
        ms = statistics.median(per_step[key]) * 1e3
        print(f"  {key:8s} {ms:8.2f} ms/step  {statistics.median(ratios[key]):.3f}x bare  (+{ms - bare_ms:.2f} ms)")
    log_ms = statistics.median(logging_steps) * 1e3
    bare_step = statistics.median(bare_steps) * 1e3
    print(
        f"  logging step (every=1, median) {log_ms:.2f} ms = {log_ms / bare_step:.2f}x the bare step ({bare_step:.2f})"
    )
    tmp.cleanup()


def stats_pass(modules: int, batch: int, reps: int = 15) -> None:
    """``RecordBatch`` over a logging step's tensors against one read of their bytes."""
    from introspect.records.stats import RecordBatch

    torch.manual_seed(0)
    model = mlp(modules)
    x = torch.randn(batch, 32)
    acts: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda m, a, o: acts.append(o.detach().clone())) for m in model]
    model(x).square().mean().backward()
    for h in hooks:
        h.remove()
    tensors = acts + [p.detach() for p in model.parameters()] + [p.grad for p in model.parameters()]
    big = torch.ones(sum(t.numel() for t in tensors))

    def timed(fn: Callable[[], object], reps: int = reps) -> float:
        fn()
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples)

    def statistics_pass(hold: bool) -> None:
        batch_ = RecordBatch()
        for t in tensors:
            batch_.add(t, hold=hold)
        batch_.compute().cpu()

    read_s = timed(lambda: big.sum())
    for hold, how in ((False, "each copied when added"), (True, "held, packed (as watch does)")):
        pass_s = timed(lambda hold=hold: statistics_pass(hold))
        print(
            f"  stats pass, {how}: {len(tensors)} tensors ({big.numel() * 4 / 1e6:.2f} MB) {pass_s * 1e3:.2f} ms, "
            f"{pass_s / len(tensors) * 1e6:.1f} us per tensor; one read {read_s * 1e6:.0f} us, "
            f"ratio {pass_s / read_s:.1f}x"
        )
    large = [torch.randn(64, 256, 28, 28) for _ in range(4)]  # 51 MB: large tensors
    read_large = timed(lambda: [t.sum() for t in large], reps=5)
    for hold in (False, True):

        def pass_large(hold: bool = hold) -> None:
            batch_ = RecordBatch()
            for t in large:
                batch_.add(t, hold=hold)
            batch_.compute().cpu()

        print(f"  stats pass of 4 x 12.8M values: {timed(pass_large, reps=5) / read_large:.2f}x one read")
        break  # (large tensors are never held: one line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", type=int, nargs="+", default=[51, 201, 801])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--chunk", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--log-chunk", type=int, default=10, help="steps per chunk of the every=1 variant")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for modules in args.modules:
        run(modules, args.rounds, args.chunk, args.batch, args.log_chunk)
        stats_pass(modules, args.batch)


if __name__ == "__main__":
    main()
