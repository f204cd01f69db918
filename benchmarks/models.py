"""The benchmark models: one registry entry each, with how long each runs.

To add a model, write a builder ``(device) -> (model, x, y, description)`` and give it one line in
``MODELS``. The builder leaves out the loss and optimizer (``build_model`` names them) and the
seed (``build_model`` seeds before it runs); it makes the model, then ``x``, then ``y``, the order
that fixes which weights and data the seeded stream gives. ``y is None`` marks a causal LM that computes its own
loss; every other model is a binary classifier (see ``train_loss``).

torch and the model libraries are imported inside the builders: the harness imports what the
chosen models need (``ModelSpec.imports``) once, before it forks a worker per model, and
``--help`` answers without importing torch at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "GPT2_BATCH",
    "GPT2_SIZE",
    "LLAMA_SIZE",
    "MODELS",
    "SCALE_MODELS",
    "ModelSpec",
    "build_model",
    "model_title",
    "train_loss",
]

Built = tuple[Any, Any, Any, str]
"""(model, x, y, description): what a builder returns (``y`` None for a causal LM)."""


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark model. ``steps`` is K, the steps per timed chunk; ``warmup`` the warm-up
    steps per variant; ``quick_*`` the same for ``--quick``. ``attention``: the attention probe's
    on/off pair of variants runs on it. ``imports``: modules the harness imports before forking.
    ``cuda_name``: the model built instead on CUDA (a size that loads a GPU), named in titles."""

    build: Callable[[str], Built]
    steps: int
    warmup: int
    quick_steps: int
    quick_warmup: int
    attention: bool = False
    imports: tuple[str, ...] = ()
    cuda_name: str | None = None
    scale: bool = False
    """On the scale axis (``--scale``): how the cost grows with the module count."""

    def chunk(self, quick: bool) -> tuple[int, int]:
        """(steps per chunk, warm-up steps) for a full or a ``--quick`` run."""
        return (self.quick_steps, self.quick_warmup) if quick else (self.steps, self.warmup)


GPT2_SIZE = dict(n_layer=2, n_head=4, n_embd=128, vocab_size=1024, n_positions=64)
GPT2_BATCH = 8


def tiny_gpt2():
    """GPT-2 with two blocks from ``GPT2Config`` (random weights, nothing downloaded): a CPU step
    of tens of ms, where per-module Python overhead is a visible share of the step."""
    import transformers

    config = transformers.GPT2Config(**GPT2_SIZE, bos_token_id=0, eos_token_id=0, loss_type="ForCausalLM")
    return transformers.GPT2LMHeadModel(config)


def _gpt2(device: str) -> Built:
    import torch

    model = tiny_gpt2()
    x = torch.randint(0, GPT2_SIZE["vocab_size"], (GPT2_BATCH, GPT2_SIZE["n_positions"]))
    desc = (
        f"GPT-2 tiny (transformers GPT2Config, random weights): {GPT2_SIZE['n_layer']} blocks, "
        f"{GPT2_SIZE['n_head']} heads, n_embd {GPT2_SIZE['n_embd']}, vocab {GPT2_SIZE['vocab_size']}, "
        f"batch {GPT2_BATCH} of {GPT2_SIZE['n_positions']} tokens, its own LM loss (labels=input_ids)"
    )
    return model, x, None, desc


def _binary_labels(batch: int):
    import torch

    return torch.randint(0, 2, (batch, 1)).float()


def _seed_cnn(device: str) -> Built:
    import torch

    from examples.models import SeedCNN

    model = SeedCNN()
    x = torch.randn(64, 3, 32, 32)
    return model, x, _binary_labels(64), "SeedCNN (examples/models.py), batch 64 of 3x32x32"


def _ring_mlp(device: str) -> Built:
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
    x = torch.randn(16, 2) * 1.5
    y = (x.norm(dim=1, keepdim=True) > 1.2).float()  # inside/outside a ring
    return model, x, y, "ring MLP 2-16-8-1 with ReLU, batch 16 (per-step overhead dominates)"


def _resnet(device: str) -> Built:
    import torch
    import torchvision

    if device == "cuda":
        model = torchvision.models.resnet50(weights=None, num_classes=1)
        x = torch.randn(128, 3, 224, 224)
        return model, x, _binary_labels(128), "torchvision resnet50 (weights=None; the GPU size), batch 128 at 224x224"
    model = torchvision.models.resnet18(weights=None, num_classes=1)
    x = torch.randn(16, 3, 64, 64)
    return model, x, _binary_labels(16), "torchvision resnet18 (weights=None), batch 16 at 64x64"


def _tiny_transformer(device: str) -> Built:
    import torch
    from torch import nn

    class TinyTransformer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128, dropout=0.1, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
            self.head = nn.Linear(64, 1)

        def forward(self, x):
            return self.head(self.encoder(x).mean(dim=1))

    model = TinyTransformer()
    x = torch.randn(32, 32, 64)
    desc = "nn.TransformerEncoder, d_model 64, 4 heads, 2 layers, batch 32 of 32 tokens"
    return model, x, _binary_labels(32), desc


def _mlp_stack(pairs: int) -> Callable[[str], Built]:
    """``pairs`` x (Linear 32->32, ReLU) in one ``nn.Sequential``: 2 * pairs + 1 modules, the
    root included; the same small layer repeated, so only the module count grows."""

    def build(device: str) -> Built:
        import torch
        from torch import nn

        model = nn.Sequential(*[m for _ in range(pairs) for m in (nn.Linear(32, 32), nn.ReLU())])
        x = torch.randn(64, 32)
        y = torch.randint(0, 2, (64, 32)).float()
        desc = f"MLP of {pairs} x (Linear 32->32, ReLU), {2 * pairs + 1} modules, batch 64, 32 binary outputs"
        return model, x, y, desc

    return build


LLAMA_SIZE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=64,
)


def _llama(device: str) -> Built:
    """A Llama-style decoder from transformers' ``LlamaConfig`` (random weights, nothing
    downloaded): 8 layers of a tiny hidden size, so the per-module cost shows."""
    import torch
    import transformers

    config = transformers.LlamaConfig(**LLAMA_SIZE, bos_token_id=0, eos_token_id=0)
    model = transformers.LlamaForCausalLM(config)
    x = torch.randint(0, LLAMA_SIZE["vocab_size"], (8, 32))
    modules = len(list(model.modules()))
    desc = (
        f"Llama-style decoder (transformers LlamaConfig, random weights): {LLAMA_SIZE['num_hidden_layers']} layers, "
        f"hidden {LLAMA_SIZE['hidden_size']}, {LLAMA_SIZE['num_attention_heads']} heads "
        f"({LLAMA_SIZE['num_key_value_heads']} KV), vocab {LLAMA_SIZE['vocab_size']}, {modules} modules, "
        "batch 8 of 32 tokens, its own LM loss (labels=input_ids)"
    )
    return model, x, None, desc


MODELS: dict[str, ModelSpec] = {
    "cnn": ModelSpec(_seed_cnn, steps=100, warmup=5, quick_steps=4, quick_warmup=2),
    "mlp": ModelSpec(_ring_mlp, steps=200, warmup=20, quick_steps=25, quick_warmup=5),
    "resnet18": ModelSpec(
        _resnet, steps=20, warmup=2, quick_steps=1, quick_warmup=1, imports=("torchvision",), cuda_name="resnet50"
    ),
    "transformer": ModelSpec(_tiny_transformer, steps=100, warmup=5, quick_steps=5, quick_warmup=2, attention=True),
    "gpt2": ModelSpec(
        _gpt2, steps=50, warmup=5, quick_steps=4, quick_warmup=2, attention=True, imports=("transformers",)
    ),
    # The scale axis (--scale): the same layer 25, 100 and 400 times, and a decoder of 8 layers.
    "mlp51": ModelSpec(_mlp_stack(25), steps=20, warmup=3, quick_steps=3, quick_warmup=1, scale=True),
    "mlp201": ModelSpec(_mlp_stack(100), steps=10, warmup=2, quick_steps=2, quick_warmup=1, scale=True),
    "mlp801": ModelSpec(_mlp_stack(400), steps=5, warmup=2, quick_steps=2, quick_warmup=1, scale=True),
    "llama8": ModelSpec(
        _llama, steps=10, warmup=2, quick_steps=2, quick_warmup=1, attention=True, imports=("transformers",), scale=True
    ),
}

SCALE_MODELS = [name for name, spec in MODELS.items() if spec.scale]
"""``--scale``'s models, in order of module count."""


def build_model(name: str, device: str) -> Built:
    """(model, x, y, description) for one benchmark model, seeded, on ``device``; ``y`` is None
    for the language model (see :func:`train_loss`)."""
    import torch

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    torch.manual_seed(0)
    model, x, y, desc = MODELS[name].build(device)
    desc += ", Adam" if y is None else ", BCEWithLogits, Adam"
    return model.to(device), x.to(device), None if y is None else y.to(device), desc


def train_loss(model, x, y):
    """The step's loss. ``y is None`` marks a causal LM trained with its own loss (the labels are
    the input ids, shifted inside the model); every other model is a binary classifier."""
    import torch.nn.functional as F

    if y is None:
        return model(input_ids=x, labels=x).loss
    return F.binary_cross_entropy_with_logits(model(x), y)


def model_title(name: str, device: str | None) -> str:
    """The model's name in headings, with the model built in its place on CUDA, if any."""
    cuda_name = MODELS[name].cuda_name if name in MODELS else None
    return f"{name} ({cuda_name} on CUDA)" if cuda_name and device == "cuda" else name
