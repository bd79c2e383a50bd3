"""Model folders: weights (safetensors), config, tokenizer and preprocessing travel together.

A model folder holds config.json, model.safetensors, tokenizer.json and preprocess.json; the
export issue adds manifest.json on top. Weights may be stored in fp16 to keep the repository
light; they load back as fp32.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from tokenizers import Tokenizer

from compression.config import ModelConfig
from compression.config_file import ConfigError, NotAModelFolder
from compression.modeling import TrimVLM
from service.preprocess import Preprocessing


@dataclass
class LoadedModel:
    model: TrimVLM
    tokenizer: Tokenizer
    preprocessing: Preprocessing
    path: Path | None = None
    rerank_itc_weight: float = 0.0  # rerank.json's calibrated weight (compression/rerank.py); 0: ITM alone


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_model_dir(
    out: str | Path,
    model: TrimVLM,
    tokenizer: Tokenizer,
    preprocessing: Preprocessing,
    dtype: str = "fp32",
    extra_metadata: dict | None = None,
) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    preprocessing = with_positions(preprocessing, model.config)
    model.config.save(out / "config.json")
    to_save = model if dtype == "fp32" else copy.deepcopy(model).to(_DTYPES[dtype])
    metadata = {"format": "pt", "dtype": dtype, **{k: str(v) for k, v in (extra_metadata or {}).items()}}
    save_model(to_save, str(out / "model.safetensors"), metadata=metadata)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "preprocess.json").write_text(json.dumps(preprocessing.model_dump(mode="json"), indent=2) + "\n")
    return out


def load_model_dir(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    path = Path(path)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocess.json"):
        if not (path / name).is_file():
            raise NotAModelFolder(f"{path} is not a model folder: {name} is missing")
    cfg = ModelConfig.load(path / "config.json")
    model = TrimVLM(cfg)
    # Load in the stored dtype, then cast: load_model copies values, so an fp16 file fills an
    # fp16 model exactly before the upcast to fp32.
    with open(path / "model.safetensors", "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    stored = header.get("__metadata__", {}).get("dtype", "fp32")
    model.to(_DTYPES[stored])
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=True)
    model.float().to(device).eval()
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    pre = with_positions(Preprocessing.model_validate_json((path / "preprocess.json").read_text()), cfg)
    return LoadedModel(model, tokenizer, pre, path, load_rerank_weight(path))


RERANK_FILE = "rerank.json"


def load_rerank_weight(path: str | Path) -> float:
    """The folder's calibrated ITC weight in the re-ranking score (rerank.json), 0 without one."""
    f = Path(path) / RERANK_FILE
    if not f.is_file():
        return 0.0
    try:
        weight = json.loads(f.read_text()).get("itc_weight")
    except (ValueError, AttributeError):
        raise ConfigError(f"{f}: not a JSON object with itc_weight (`trimvlm calibrate-rerank` writes it)") from None
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
        raise ConfigError(f"{f}: itc_weight must be a number >= 0, got {weight!r}")
    return float(weight)


def with_positions(pre: Preprocessing, cfg: ModelConfig) -> Preprocessing:
    """The preprocessing with the model's text positions recorded (`max_positions`): the config is
    the truth, also for folders written before the field existed, so every export's manifest carries
    the limit the service checks caption lengths against."""
    return pre.model_copy(update={"max_positions": cfg.max_position_embeddings})
