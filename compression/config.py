"""Model configuration: one dataclass for the whole family.

Per-layer head counts and FFN widths are lists, so a pruned model is the same class with
smaller numbers (a layer with 0 heads or 0 neurons keeps only its bias path).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class ModelConfig:
    name: str = "trimvlm"
    role: str = "teacher"  # teacher | student

    # Vision encoder (ViT, pre-LN, BLIP naming)
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 384
    vision_head_dim: int = 64
    vision_heads: list[int] = field(default_factory=lambda: [6] * 4)
    vision_mlp: list[int] = field(default_factory=lambda: [1536] * 4)
    vision_layer_norm_eps: float = 1e-5

    # Text side (BERT, post-LN, BLIP naming). Shared by text encoder, fusion encoder, decoder.
    text_width: int = 384
    text_head_dim: int = 32
    vocab_size: int = 30522
    max_position_embeddings: int = 64
    text_layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    cls_token_id: int = 101
    sep_token_id: int = 102
    bos_token_id: int = 102  # decoder start token ([DEC] when the vocabulary has it)

    text_heads: list[int] = field(default_factory=lambda: [12] * 2)
    text_mlp: list[int] = field(default_factory=lambda: [1536] * 2)

    # Fusion encoder: self-attention + cross-attention to image tokens + FFN
    fusion_self_heads: list[int] = field(default_factory=lambda: [12] * 2)
    fusion_cross_heads: list[int] = field(default_factory=lambda: [12] * 2)
    fusion_mlp: list[int] = field(default_factory=lambda: [1536] * 2)

    # Text decoder: causal self-attention + cross-attention + FFN, LM head tied to its embeddings
    decoder_self_heads: list[int] = field(default_factory=lambda: [12] * 2)
    decoder_cross_heads: list[int] = field(default_factory=lambda: [12] * 2)
    decoder_mlp: list[int] = field(default_factory=lambda: [1536] * 2)
    # Width of the states the decoder cross-attends to. Captions attend to image tokens and
    # generative VQA to fused question states (as BLIP does), so both must have this width.
    decoder_cross_width: int | None = None
    # Whether the decoder was trained to write VQA answers from fused question states (our own
    # training does both tasks; of the imported BLIPs only BlipForQuestionAnswering does).
    decoder_answers: bool = True

    # Heads
    embed_dim: int = 128  # ITC projection
    answers: list[str] = field(default_factory=list)  # closed VQA vocabulary
    # BLIP computes ITC text features with the fusion layers run text-only (its text encoder
    # *is* the fusion encoder); X-VLM uses a separate text encoder. Imported BLIP sets True.
    itc_text_through_fusion: bool = False
    # Heads of the attention pool over the text tokens added to [CLS] for the ITC text embedding
    # (modeling.TextAttentionPool); 0: [CLS] alone, as BLIP. A one-layer text encoder's [CLS] attends
    # only to word embeddings, so it cannot bind an attribute to its object; pooling the
    # contextualised tokens is that second step.
    text_pool_heads: int = 0
    # Hidden width of the token-evidence ITM term (modeling.TokenEvidence); 0: the [CLS] head alone,
    # as BLIP. One fusion layer gives [CLS] a single look at the image, so a student whose captions
    # state several relations needs every text token's own match evidence pooled.
    itm_evidence_hidden: int = 0
    # SmartTrim trimming modules (compression/trim.py): {"hidden": d'} or None for none
    trimming: dict | None = None

    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0

    def __post_init__(self) -> None:
        pairs = {
            "vision": (self.vision_heads, self.vision_mlp),
            "text": (self.text_heads, self.text_mlp),
            "fusion": (self.fusion_self_heads, self.fusion_mlp),
            "decoder": (self.decoder_self_heads, self.decoder_mlp),
        }
        for stack, (heads, mlp) in pairs.items():
            if len(heads) != len(mlp):
                raise ValueError(f"{stack}: {len(heads)} head counts but {len(mlp)} FFN widths")
        if len(self.fusion_cross_heads) != len(self.fusion_self_heads):
            raise ValueError("fusion_cross_heads must have one entry per fusion layer")
        if len(self.decoder_cross_heads) != len(self.decoder_self_heads):
            raise ValueError("decoder_cross_heads must have one entry per decoder layer")
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")

    # Derived sizes -------------------------------------------------------------------------
    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        return self.num_patches + 1

    @property
    def num_answers(self) -> int:
        return len(self.answers)

    @property
    def cross_width(self) -> int:
        return self.decoder_cross_width or self.vision_width

    @property
    def generative_vqa(self) -> bool:
        """The decoder answers from fused question states: trained to, and their width matches."""
        return self.decoder_answers and self.cross_width == self.text_width

    @property
    def layer_counts(self) -> dict[str, int]:
        return {
            "vision": len(self.vision_heads),
            "text": len(self.text_heads),
            "fusion": len(self.fusion_self_heads),
            "decoder": len(self.decoder_self_heads),
        }

    # Serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
