"""A transformer that goes unstable, and what the debugger says: a tiny GPT-2 (``GPT2Config``,
random weights, nothing downloaded) trained on random tokens, twice.

* ``healthy``: AdamW at lr 1e-3; the report finds nothing.
* ``broken``: the same run, but halfway through, one layer's query and key projections are scaled
  ×30 (what attention logit growth does slowly, at once): its attention turns one-hot. The report
  names ``transformer.h.1.attn`` (``attention_logit_growth``, ``attention_entropy_collapse``) at
  the first logging step after the change; then the learning rate jumps ×1000 and the global
  gradient norm spikes (``grad_norm_spike``, with ``diagnostics/pre_spike`` in TensorBoard).

    python examples/transformer_instability.py                 # logs in runs/transformer/{healthy,broken}
    python examples/transformer_instability.py --quick         # fewer steps, a few seconds
    tensorboard --logdir runs/transformer --host 127.0.0.1     # SCALARS: attention/*, TEXT: diagnostics/*
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as `python examples/transformer_instability.py` from anywhere: make the repo importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import introspect  # noqa: E402

VOCAB, SEQ, BATCH = 64, 32, 8


def tiny_gpt2() -> torch.nn.Module:
    """Two blocks, two heads, width 32. initializer_range 0.05 gives the fresh model attention
    logits of a size a trained one has (at GPT-2's 0.02 they are ~0.05)."""
    import transformers

    config = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=VOCAB,
        n_positions=SEQ,
        initializer_range=0.05,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def run(logdir: Path, steps: int, broken: bool) -> introspect.Watcher:
    torch.manual_seed(0)
    model = tiny_gpt2()
    data = [torch.randint(0, VOCAB, (BATCH, SEQ)) for _ in range(16)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    change, jump = steps // 2 + 1, steps - 4  # not logging steps: the finding comes at the next one
    with introspect.watch(model, logdir, every=5, optimizer=opt, summary=False, graph=False) as w:
        for step in range(steps):
            if broken and step == change:
                with torch.no_grad():  # layer 1's query and key columns of its fused projection
                    model.transformer.h[1].attn.c_attn.weight[:, : 2 * model.config.n_embd] *= 30
            if broken and step == jump:
                for group in opt.param_groups:
                    group["lr"] *= 1000
            x = data[step % len(data)]
            logits = model(x).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad()
    return w


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", type=Path, default=Path("runs/transformer"))
    parser.add_argument("--quick", action="store_true", help="40 steps instead of 200")
    args = parser.parse_args(argv)
    steps = 40 if args.quick else 200
    for name, broken in (("healthy", False), ("broken", True)):
        w = run(args.logdir / name, steps, broken)
        print(f"== {name}")
        print(w.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
