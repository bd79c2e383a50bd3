"""Initialise the text side from pretrained MiniLM-L6 (BERT naming), offline, with safetensors.

Keys are mapped explicitly and shapes asserted (nanoGPT's from_pretrained style). The layer map
says which MiniLM layer initialises each text-encoder, fusion and decoder layer; cross-attention
and the heads stay freshly initialised, as in EfficientVLM/BLIP.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from compression.modeling import TrimVLM

_LAYER_PARTS = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "attention.output.LayerNorm",
    "intermediate.dense",
    "output.dense",
    "output.LayerNorm",
]


def load_bert_text_side(
    model: TrimVLM,
    weights_path: str | Path,
    old_ids: list[int | None],
    text_layers: list[int],
    fusion_layers: list[int],
    decoder_layers: list[int],
) -> list[str]:
    """Copy BERT/MiniLM weights into the model's text encoder, fusion encoder and decoder.

    old_ids maps each of our vocabulary rows to a row of the source vocabulary (None: new token,
    initialised from [CLS]). Returns the list of our parameter names that were initialised.
    """
    cfg = model.config
    src = load_file(str(weights_path))
    src = {k.removeprefix("bert."): v for k, v in src.items()}
    assigned: dict[str, torch.Tensor] = {}

    table = src["embeddings.word_embeddings.weight"]
    cls_row = table[old_ids[cfg.cls_token_id]]
    words = torch.stack([table[i] if i is not None else cls_row for i in old_ids])
    # Token-type embeddings are constant (type 0) for us: fold them into the positions.
    positions = src["embeddings.position_embeddings.weight"][: cfg.max_position_embeddings]
    if "embeddings.token_type_embeddings.weight" in src:
        positions = positions + src["embeddings.token_type_embeddings.weight"][0]
    for prefix in ("text_encoder.embeddings", "text_decoder.bert.embeddings"):
        assigned[f"{prefix}.word_embeddings.weight"] = words
        assigned[f"{prefix}.position_embeddings.weight"] = positions
        assigned[f"{prefix}.LayerNorm.weight"] = src["embeddings.LayerNorm.weight"]
        assigned[f"{prefix}.LayerNorm.bias"] = src["embeddings.LayerNorm.bias"]

    targets = [
        ("text_encoder.encoder.layer", text_layers, cfg.layer_counts["text"]),
        ("fusion_encoder.layer", fusion_layers, cfg.layer_counts["fusion"]),
        ("text_decoder.bert.encoder.layer", decoder_layers, cfg.layer_counts["decoder"]),
    ]
    for prefix, layer_map, n in targets:
        if len(layer_map) != n:
            raise ValueError(f"{prefix}: layer map {layer_map} has {len(layer_map)} entries for {n} layers")
        for ours, theirs in enumerate(layer_map):
            for part in _LAYER_PARTS:
                for kind in ("weight", "bias"):
                    key = f"encoder.layer.{theirs}.{part}.{kind}"
                    if key not in src:
                        raise KeyError(f"pretrained weights lack {key}")
                    assigned[f"{prefix}.{ours}.{part}.{kind}"] = src[key]

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in assigned.items():
            if name not in params:
                raise KeyError(f"model has no parameter {name}")
            if params[name].shape != value.shape:
                raise ValueError(f"{name}: model shape {tuple(params[name].shape)} != pretrained {tuple(value.shape)}")
            params[name].copy_(value)
    return sorted(assigned)
