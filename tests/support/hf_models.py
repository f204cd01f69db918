"""Tiny Hugging Face models built from configs (random weights, nothing downloaded), and the
folders ``save_pretrained`` leaves: one safetensors file, or shards of ``pytorch_model-*.bin``
with their index (the format transformers wrote before safetensors became its default)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

VOCAB = 100
SEQ = 8

SAVE_FORMATS = ("safetensors", "sharded_bin")


def tiny_gpt2() -> nn.Module:
    """GPT-2 with two blocks; its head is tied to the token embedding (stored once on disk)."""
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def tiny_decoder(
    family: str = "llama", impl: str = "sdpa", seed: int = 0, positions: int = 64, **overrides: object
) -> nn.Module:
    """A two-layer Llama- or Qwen2-style causal LM (grouped-query attention: 4 query heads, 2
    key/value heads; hidden 32, vocabulary 64), random weights seeded with ``seed``."""
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    config = config_cls(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        attn_implementation=impl,
        **overrides,
    )
    torch.manual_seed(seed)
    return model_cls(config)


def tiny_bert() -> nn.Module:
    """BERT for masked LM with two layers; its decoder is tied to the word embeddings."""
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        pad_token_id=0,
    )
    return transformers.BertForMaskedLM(config)


MODELS = {"gpt2": tiny_gpt2, "bert": tiny_bert}


def token_ids(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def save(model: nn.Module, folder: Path, fmt: str) -> Path:
    """``model.save_pretrained(folder)`` as one safetensors file, or as several .bin shards."""
    if fmt == "safetensors":
        model.save_pretrained(folder)
        return folder
    if fmt != "sharded_bin":
        raise ValueError(fmt)
    from safetensors.torch import load_file

    model.save_pretrained(folder, max_shard_size="40KB")
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1, "the test wants several shards"
    renamed = {}
    for i, shard in enumerate(shards, 1):
        name = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        torch.save(load_file(str(folder / shard)), folder / name)
        (folder / shard).unlink()
        renamed[shard] = name
    index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    index_file.unlink()
    return folder
