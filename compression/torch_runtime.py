"""torch: a torch model run eagerly behind the service's two interfaces, the one torch-side adapter.

- `TorchRuntime` is a `service.runtime.base.Runtime`: named graphs on numpy arrays, the exporter's
  own graph modules (`compression.export.graph_modules`), so parity checks compare the very modules
  that were exported with ONNX Runtime / TensorRT. It is the `torch` backend of `service.runtime`,
  registered in the `trimvlm.runtimes` entry-point group (pyproject.toml): the service finds it by
  name and imports it (and torch) only when that backend is asked for.
- `TorchTasks` presents a torch model folder with the task methods of `service.tasks.TaskModel`, so
  one set of evaluation loops (compression/evaluate.py) scores torch and exported models alike. Like
  TaskModel it runs the vision and text graphs through its runtime; fusion (with the fused states),
  captions and generative answers use the model's own torch code (greedy `TrimVLM.generate`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from compression.artifacts import LoadedModel, load_model_dir
from compression.export import graph_modules
from compression.modeling import TrimVLM
from compression.tokenization import decode_ids
from service.preprocess import encode_texts, normalize_uint8
from service.runtime.base import Runtime, RuntimeOptions, RuntimeUnavailable, TensorSpec, prepare_feeds
from service.tasks import Encoders


def pick_device(name: str) -> torch.device:
    """`auto`: the GPU when torch sees one, else the CPU; any other name as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _outputs(outs) -> tuple:
    return outs if isinstance(outs, tuple | list) else (outs,)


class TorchRuntime(Runtime):
    """A model folder's graph modules, run eagerly. Graph names pick modules from
    `graph_modules`; file paths are ignored (the weights come from `model_dir`, or `model`)."""

    name = "torch"

    def __init__(self, options: RuntimeOptions | None = None, model_dir: str | Path | None = None, model: TrimVLM | None = None):
        super().__init__(options)
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.model = model
        self.device = self.options.device
        self._modules: dict = {}  # name -> compression.export_graphs.GraphModule
        self._specs: dict[str, tuple[list[TensorSpec], list[TensorSpec]]] = {}

    @classmethod
    def from_model(cls, model: TrimVLM, device: str | torch.device, graphs: tuple[str, ...]) -> TorchRuntime:
        """A runtime over a model already loaded on `device` (evaluation, the training loop's
        validation), with `graphs` ready to run."""
        rt = cls(RuntimeOptions(device=torch.device(device).type), model=model)
        rt.device = str(device)
        rt._open(graphs)
        return rt

    def check_available(self) -> None:
        if self.options.device not in ("cpu", "cuda"):
            raise ValueError(f"torch: unknown device {self.options.device!r} (cpu | cuda)")
        if self.options.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeUnavailable(f"torch {torch.__version__}: no CUDA GPU (torch.cuda.is_available() is False)")

    def load(self, graphs: dict[str, Path]) -> None:
        self.check_available()
        if self.model is None and self.model_dir is None:
            raise ValueError("torch: TorchRuntime needs model_dir (a model folder) to load graph modules from")
        if self.options.intra_op_threads > 0:
            torch.set_num_threads(self.options.intra_op_threads)  # process-wide: parity runs only
        if self.model is None:
            self.model = load_model_dir(self.model_dir).model
        self._open(tuple(graphs))

    def _open(self, names: tuple[str, ...]) -> None:
        registry = graph_modules(self.model)
        unknown = sorted(set(names) - set(registry))
        if unknown:
            raise KeyError(f"torch: no graph module(s) {unknown} for {self.model_dir}; available: {sorted(registry)}")
        for name in names:
            gm = registry[name]
            gm.module.to(self.device).eval()
            self._modules[name] = gm
            self._specs[name] = self._graph_specs(gm)

    def _graph_specs(self, gm) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """Specs from the graph's example inputs (the ones export traces with) and its dynamic
        axes; without a sample, dtypes and shapes are unknown and feeds are passed as they are."""
        sample = getattr(gm, "sample", None)
        if sample is None:
            return [TensorSpec(n, "unknown", ()) for n in gm.inputs], [TensorSpec(n, "unknown", ()) for n in gm.outputs]
        axes = getattr(gm, "dynamic_axes", {}) or {}
        with torch.random.fork_rng(devices=[]), torch.inference_mode():  # leaves the caller's random stream alone
            args = sample(1, 2)
            outs = _outputs(gm.module(*[a.to(self.device) for a in args]))

        def spec(name, t):
            names = axes.get(name, {})
            return TensorSpec(name, str(t.dtype).removeprefix("torch."), tuple(names.get(i, d) for i, d in enumerate(t.shape)))

        return [spec(n, t) for n, t in zip(gm.inputs, args, strict=True)], [
            spec(n, t) for n, t in zip(gm.outputs, outs, strict=True)
        ]

    def _graph(self, graph: str):
        if graph not in self._modules:
            raise self._unknown_graph(graph)
        return self._modules[graph]

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        gm = self._graph(graph)
        feeds = prepare_feeds(graph, self.inputs(graph), feeds)
        args = [torch.from_numpy(feeds[n]).to(self.device) for n in gm.inputs]
        with torch.inference_mode():
            outs = _outputs(gm.module(*args))
        if len(outs) != len(gm.outputs):
            raise RuntimeError(f"torch: graph {graph!r} returned {len(outs)} outputs, expected {gm.outputs}")
        # numpy has no bfloat16: hand those back as float32.
        outs = [t.float() if t.dtype == torch.bfloat16 else t for t in outs]
        return {n: t.detach().cpu().numpy() for n, t in zip(gm.outputs, outs, strict=True)}

    def inputs(self, graph: str) -> list[TensorSpec]:
        self._graph(graph)
        return self._specs[graph][0]

    def outputs(self, graph: str) -> list[TensorSpec]:
        self._graph(graph)
        return self._specs[graph][1]

    @property
    def graphs(self) -> list[str]:
        return list(self._modules)

    def describe(self) -> dict:
        return super().describe() | {
            "torch_version": torch.__version__,
            "model_dir": str(self.model_dir),
            "threads": torch.get_num_threads(),
        }

    def close(self) -> None:
        self._modules.clear()
        self._specs.clear()


class TorchTasks(Encoders):
    """A loaded torch model folder behind TaskModel's task methods (numpy in, numpy out)."""

    def __init__(self, lm: LoadedModel, device: str | torch.device = "cpu"):
        self.lm, self.model, self.device = lm, lm.model, device
        self.rerank_itc_weight = lm.rerank_itc_weight
        self.tokenizer, self.pre = lm.tokenizer, lm.preprocessing
        self.runtime = TorchRuntime.from_model(lm.model, device, ("vision", "text"))

    def _t(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).to(self.device)

    def pixels(self, images_u8: np.ndarray) -> np.ndarray:
        return normalize_uint8(images_u8, self.pre.image)

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return encode_texts(self.tokenizer, texts, self.pre.max_text_length)

    @torch.no_grad()
    def fuse(self, text_states: np.ndarray, mask: np.ndarray, image_states: np.ndarray) -> dict[str, np.ndarray]:
        text_mask = self._t(mask).bool()
        fused = self.model.fuse(self._t(text_states), text_mask, self._t(image_states)).last_hidden_state
        return {
            "vqa_logits": self.model.vqa_logits(fused).cpu().numpy(),
            "itm_logits": self.model.itm_logits(fused, text_mask).cpu().numpy(),
            "fused_states": fused.cpu().numpy(),
        }

    def _decode(self, ids: torch.Tensor) -> list[str]:
        cfg = self.model.config
        return [decode_ids(self.tokenizer, row, cfg.sep_token_id, cfg.pad_token_id) for row in ids.tolist()]

    @torch.no_grad()
    def captions(self, image_states: np.ndarray, max_length: int | None = None, num_beams: int = 1) -> list[str]:
        return self._decode(self.model.generate(self._t(image_states), max_new_tokens=max_length or self.pre.max_caption_length))

    @torch.no_grad()
    def generate_answers(self, fused_states: np.ndarray, mask: np.ndarray) -> list[str]:
        return self._decode(
            self.model.generate(self._t(fused_states), self._t(mask).bool(), max_new_tokens=self.pre.max_answer_length)
        )

    @property
    def answer_vocab(self) -> list[str]:
        return self.model.config.answers

    @property
    def generative_vqa(self) -> bool:
        return bool(self.model.config.generative_vqa)
