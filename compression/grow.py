"""A student one layer deeper: a layer appended to one stack, cut from a teacher layer.

EfficientVLM and DLIP trade depth between the stacks of a student; here a layer is added where
a measurement says the student lacks a step (one fusion layer cannot let a text token use what
another token found in the image). The new layer is the teacher's layer `from_layer` (its last by
default) with its first heads and FFN neurons kept (prune.slice_model), so it starts from trained
weights; every other weight is the student's, unchanged. The layer's trimmers start fresh:
distil the grown model, then retune its trimmers and re-calibrate its levels.
"""

from __future__ import annotations

from pathlib import Path

import torch

from compression.distill import LAYER_PREFIX, STACK_FIELDS
from compression.flops import count_params
from compression.modeling import ModelConfig, TrimVLM
from compression.prune import GROUPS, slice_model

# the unit kinds of each stack, named as in prune.GROUPS
KINDS = {stack: tuple(kind for (s, kind) in GROUPS if s == stack) for stack in STACK_FIELDS}
_WIDTH = {"vision": "vision_width", "text": "text_width", "fusion": "text_width", "decoder": "text_width"}


def grow(student: TrimVLM, teacher: TrimVLM, stack: str, units: dict[str, int], from_layer: int = -1) -> TrimVLM:
    """`student` with one more layer at the end of `stack`: teacher layer `from_layer` cut to
    `units` per kind ({"head": 2, "cross": 2, "ffn": 64} for fusion; see KINDS)."""
    if stack not in KINDS:
        raise ValueError(f"stack: one of {', '.join(KINDS)}, got {stack!r}")
    if set(units) != set(KINDS[stack]):
        raise ValueError(f"{stack} layers need a count for each of {', '.join(KINDS[stack])}, got {sorted(units)}")
    s_cfg, t_cfg = student.config, teacher.config
    s_width, t_width = getattr(s_cfg, _WIDTH[stack]), getattr(t_cfg, _WIDTH[stack])
    if s_width != t_width:
        raise ValueError(f"the {stack} widths differ (student {s_width}, teacher {t_width})")
    n_teacher = t_cfg.layer_counts[stack]
    layer = from_layer % n_teacher if -n_teacher <= from_layer < n_teacher else None
    if layer is None:
        raise ValueError(f"from_layer: the teacher's {stack} stack has {n_teacher} layers, got {from_layer}")
    masks = {}
    for (s, kind), field_name in GROUPS.items():
        masks[(s, kind)] = [torch.ones(n) for n in getattr(t_cfg, field_name)]
        if s == stack:
            available = getattr(t_cfg, field_name)[layer]
            if not 1 <= units[kind] <= available:
                raise ValueError(f"{kind}: between 1 and the teacher layer's {available}, got {units[kind]}")
            masks[(s, kind)][layer] = (torch.arange(available) < units[kind]).float()
    cut = slice_model(teacher, masks)
    d = s_cfg.to_dict()
    for field_name in STACK_FIELDS[stack]:
        d[field_name] = list(d[field_name]) + [getattr(cut.config, field_name)[layer]]
    grown = TrimVLM(ModelConfig.from_dict(d))
    new_prefix = LAYER_PREFIX[stack].format(s_cfg.layer_counts[stack])
    src_prefix = LAYER_PREFIX[stack].format(layer)
    own, donor = student.state_dict(), cut.state_dict()
    state = grown.state_dict()  # the new layer's trimmers keep their fresh initialisation
    for key in state:
        if key.startswith(new_prefix):
            state[key] = donor[src_prefix + key[len(new_prefix) :]]
        elif key in own:
            state[key] = own[key]
    grown.load_state_dict(state, strict=True)
    return grown


def grow_dir(
    student_dir: str | Path, teacher_dir: str | Path, out: str | Path, stack: str, units: dict[str, int], from_layer: int = -1
) -> dict:
    """grow() on model folders; writes OUT (fp32) and returns the layer counts and parameters."""
    from compression.artifacts import load_model_dir, save_model_dir

    s, t = load_model_dir(student_dir, "cpu"), load_model_dir(teacher_dir, "cpu")
    grown = grow(s.model, t.model, stack, units, from_layer)
    save_model_dir(out, grown, s.tokenizer, s.preprocessing, dtype="fp32")
    n, before, n_t = (count_params(m)["total"] for m in (grown, s.model, t.model))
    return {"layers": grown.config.layer_counts, "params": n, "params_before": before, "teacher_share": n / n_t}
