"""ONNX export of the VQA path (untrimmed, or trimmed in mask / batch-1 gather mode).

The trimmed graphs take the keep thresholds as scalar inputs, so one graph serves every compute
level: the service picks a level per request and feeds its thresholds. Gather mode exports
NonZero + Gather on the token axis (data-dependent lengths, real savings at batch 1); heads are
gated rather than skipped (per-request head sets save nothing in a dense kernel).

Outputs: logits [B, answers] and, for trimmed graphs, the image tokens kept per sample (for
metrics). The FLOPs ratio is left out of the graph: its hundred small nodes cost more at batch 1
than they are worth; levels.json carries the calibrated ratio.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from compression.modeling import TrimVLM
from compression.trim import Trim, trimmed_vqa_forward

OPSET = 18


class VQAGraph(nn.Module):
    """The VQA forward as one exportable module. mode: full | mask | gather."""

    def __init__(self, model: TrimVLM, mode: str = "full"):
        super().__init__()
        if mode not in ("full", "mask", "gather"):
            raise ValueError(f"unknown VQA graph mode {mode!r} (full | mask | gather)")
        if mode != "full" and model.trimmers is None:
            raise ValueError("a trimmed graph needs a model with trimmers (run `trimvlm trim`)")
        self.model, self.mode = model.eval(), mode

    def forward(self, pixels, input_ids, attention_mask, token_threshold=None, head_threshold=None):
        if self.mode == "full":
            return self.model.vqa_forward(pixels, input_ids, attention_mask)[0]
        trim = Trim(mode=self.mode, token_threshold=token_threshold, head_threshold=head_threshold, skip_heads=False)
        logits, trace = trimmed_vqa_forward(self.model, pixels, input_ids, attention_mask, trim)
        return logits, trace.image_kv


def export_vqa(model: TrimVLM, path: str | Path, mode: str = "full") -> Path:
    """Write the VQA graph to `path` (batch and question length dynamic; gather: batch 1)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    graph = VQAGraph(model, mode)
    b = 1 if mode == "gather" else 2
    pixels = torch.randn(b, 3, cfg.image_size, cfg.image_size)
    ids = torch.full((b, 8), 5, dtype=torch.long)
    ids[:, 0] = cfg.cls_token_id
    mask = torch.ones(b, 8, dtype=torch.long)
    inputs = (pixels, ids, mask)
    names = ["pixel_values", "input_ids", "attention_mask"]
    outputs = ["logits"]
    axes = {"input_ids": {1: "text"}, "attention_mask": {1: "text"}}
    if mode != "gather":
        axes = {k: {0: "batch", **v} for k, v in axes.items()} | {"pixel_values": {0: "batch"}, "logits": {0: "batch"}}
    if mode != "full":
        inputs += (torch.tensor(0.5), torch.tensor(0.5))
        names += ["token_threshold", "head_threshold"]
        outputs += ["image_tokens_kept"]
    # The batch-1 gather graph branches on shapes at trace time on purpose (batch 1 is baked in);
    # the tracer warns about every such branch.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            graph,
            inputs,
            str(path),
            input_names=names,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    return path
