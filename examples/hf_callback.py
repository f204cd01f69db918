"""Hugging Face: ``IntrospectCallback`` watches a tiny BERT through ``Trainer.train``.

A two-layer BERT with random weights, built from a config (nothing is downloaded), learns a toy
task on synthetic token sequences: is token 1 more frequent than token 2? The callback goes in the
Trainer's ``callbacks``; as a context manager around ``train()`` it also removes its hooks if
training raises (the Trainer calls no callback then). TensorBoard shows every layer's outputs and
gradients (``activations/bert.encoder.layer.0.attention.self.query``, ...), every weight, the
summary, and a row in HPARAMS with the learning rate, batch size and final loss.

    python examples/hf_callback.py --logdir runs/hf_callback
    python examples/hf_callback.py --quick      # a few seconds, for tests
    tensorboard --logdir runs/hf_callback --host 127.0.0.1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the Hub: the model is built here

# Run as `python examples/hf_callback.py` from anywhere: make `examples` importable.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainingArguments,
)

from examples.cli import example_parser, positive_int  # noqa: E402
from introspect.integrations.transformers import IntrospectCallback

VOCAB, LENGTH = 16, 12


class CountingTask(torch.utils.data.Dataset):
    """Token sequences labelled 1 when token 1 appears more often than token 2."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
        self.labels = ((self.input_ids == 1).sum(1) > (self.input_ids == 2).sum(1)).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def tiny_bert(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = example_parser(__doc__, "hf_callback", quick="tiny run for tests: 10 steps")
    parser.add_argument("--steps", type=positive_int, default=60, help="optimizer steps (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Train, and return what happened: the log directory, steps, final loss and findings."""
    args = parse_args(argv)
    steps = 10 if args.quick else args.steps
    with tempfile.TemporaryDirectory() as output_dir:  # checkpoints are not the point here
        training = TrainingArguments(
            output_dir=output_dir,
            max_steps=steps,
            per_device_train_batch_size=32,
            learning_rate=1e-3,
            logging_steps=max(1, steps // 10),
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            seed=args.seed,
        )
        with IntrospectCallback(logdir=args.logdir, every=max(1, steps // 10)) as callback:
            trainer = Trainer(
                model=tiny_bert(args.seed),
                args=training,
                train_dataset=CountingTask(2048, seed=args.seed),
                callbacks=[callback],
            )
            result = trainer.train()

    watcher = callback.watcher
    print(watcher.report())
    print(f"global_step {trainer.state.global_step}, train loss {result.training_loss:.4f}")
    print(f"logs written to {args.logdir}")
    return {
        "logdir": args.logdir,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "alerts": len(watcher.alerts),
    }


if __name__ == "__main__":
    main()
