"""What the eager-attention path and the mixture-of-experts probe cost on a logging step, and
that they cost nothing off the cadence (no hook installed, step time unchanged).

    PYTHONPATH=$PWD python scripts/probe_cost.py [--steps 30] [--threads 1]

For each model it times training steps (forward, backward, AdamW step; the median of --steps
after a warm-up) unwatched, and watched with every=1 (every step logs) and every=10**9 (no step
but the first logs), each with the probe under test on and switched off (its ``active`` patched
to False on that watcher), the five copies stepped in turn, and prints the differences. A measurement script, not a test: timings on a shared
machine are noisy, so read the medians side by side.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
import transformers
from torch import nn

from introspect import watch
from introspect.probes.moe import MixtureOfExperts
from introspect.probes.transformer import AttentionProbe


def llama(impl: str) -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        attn_implementation=impl,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def mixtral() -> nn.Module:
    config = transformers.MixtralConfig(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config)


VARIANTS = (
    ("unwatched", None, True),
    ("every=1, probe on", 1, True),
    ("every=1, probe off", 1, False),
    ("off cadence, probe on", 10**9, True),
    ("off cadence, probe off", 10**9, False),
)


def report(name: str, make: Callable[[], nn.Module], probe: type, steps: int, seq: int) -> None:
    """One model copy per variant, all stepped in turn (round-robin), so that the load of a shared
    machine falls on every variant alike; the probe is switched off on its own watcher only."""
    ids = torch.randint(0, 1000, (4, seq), generator=torch.Generator().manual_seed(0))
    runs = []
    for label, every, on in VARIANTS:
        model = make()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        w = None
        if every is not None:
            w = watch(
                model, tempfile.mkdtemp(prefix="probe_cost_"), every=every, optimizer=opt, summary=False, graph=False
            )
            if not on:
                for p in w.probes:
                    if isinstance(p, probe):
                        p.active = lambda plan: False  # type: ignore[method-assign]
        runs.append((label, model, opt, w, []))
    try:
        for i in range(steps + 3):
            for _label, model, opt, _w, times in runs:
                start = time.perf_counter()
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad()
                if i >= 3:  # after the first steps (the first is a logging step in every variant)
                    times.append(time.perf_counter() - start)
    finally:
        for *_, w, _ in runs:
            if w is not None:
                w.close()
    ms = {label: 1000 * statistics.median(times) for label, *_, times in runs}
    print(f"\n{name} (seq {seq}, batch 4, median of {steps} steps, ms/step)")
    for label, value in ms.items():
        print(f"  {label:<24} {value:8.1f}")
    logging = ms["every=1, probe on"] - ms["every=1, probe off"]
    off = ms["off cadence, probe on"] - ms["off cadence, probe off"]
    print(f"  {probe.__name__} on a logging step: {logging:+.1f} ms; off the cadence: {off:+.1f} ms (noise)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s)")
    report("Llama 4x256, eager attention", lambda: llama("eager"), AttentionProbe, args.steps, 256)
    report("Llama 4x256, sdpa attention", lambda: llama("sdpa"), AttentionProbe, args.steps, 256)
    report("Mixtral 4x128, 8 experts top-2", mixtral, MixtureOfExperts, args.steps, 128)


if __name__ == "__main__":
    main()
