"""How big one KV block of a model is, from its HF config: sizes the store's slots before any engine runs."""

from __future__ import annotations

import json
from pathlib import Path

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "auto": 2}


def block_payload_bytes(model_dir: str | Path, block_size: int, dtype: str = "bfloat16") -> int:
    """K and V of `block_size` tokens in every layer: layers x 2 x kv_heads x head_dim x tokens x itemsize."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    cfg = cfg.get("text_config", cfg)  # multimodal configs nest the language model's
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}")
    return layers * 2 * kv_heads * head_dim * block_size * DTYPE_BYTES[dtype]
