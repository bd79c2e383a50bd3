"""The model repository: `models/<name>/<version>/manifest.json`, the contract between the
exporter (compression/, the producer) and the service (the consumer, which owns the schema).

A manifest names every graph with its inputs/outputs and files per precision, the
preprocessing and tokenizer, the compute levels with their calibration, the answer vocabulary,
measured metrics, reference outputs for verification, the sha256 of every file, and what
produced it. `verify` re-checks all of it; `list_models` walks a repository (Triton-style).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from service.levels import Levels
from service.preprocess import Preprocessing

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
Precision = Literal["fp32", "fp16", "int8"]


class TensorInfo(BaseModel):
    name: str
    dtype: str  # numpy dtype name
    shape: list[int | str]  # names for dynamic axes


class GraphInfo(BaseModel):
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    files: dict[str, str]  # precision -> file (relative to the version folder)
    batch_one: bool = False  # data-dependent shapes baked for batch 1 (trimmed gather graph)
    parity: dict[str, float] = Field(default_factory=dict)  # precision -> max |ORT - torch| at export

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


class Tokens(BaseModel):
    """Special token ids the service needs to build inputs and stop decoding."""

    pad: int
    cls: int
    sep: int
    bos: int


class FileInfo(BaseModel):
    sha256: str
    bytes: int


class Reference(BaseModel):
    """Recorded inputs and outputs (reference.npz) per graph and precision; verify reruns them."""

    file: str = "reference.npz"
    tolerance: dict[str, float] = Field(default_factory=lambda: {"fp32": 1e-4, "fp16": 5e-2, "int8": 1e-3})
    # INT8 results depend on the CPU, not only on the graph: ONNX Runtime's u8s8 kernels without
    # VNNI (AVX2) saturate 16-bit partial sums where VNNI ones do not. Recorded on one machine and
    # rerun on another, an intact graph differs by up to ~1% (relative RMS; measured AVX2 against
    # the committed default's reference); a different or damaged graph by tens of percent. An
    # output passes within `tolerance` (max abs) or within this relative RMS error.
    relative_tolerance: dict[str, float] = Field(default_factory=lambda: {"int8": 0.03})


class Manifest(BaseModel):
    schema_version: int = SCHEMA_VERSION
    name: str
    version: str
    tasks: list[str]  # vqa, caption, retrieval
    graphs: dict[str, GraphInfo]
    default_precision: dict[str, str] = Field(default_factory=lambda: {"cpu": "int8", "cuda": "fp16"})
    preprocessing: Preprocessing
    tokenizer: str = "tokenizer.json"
    tokens: Tokens
    answers: list[str]  # the closed VQA answer list (the classifier's outputs, in order)
    # classifier: the answer is picked from `answers`; generative: the decoder writes it from the
    # fused question states (BLIP's VQA models); None: the manifest predates the field (classifier
    # when it has answers)
    vqa: Literal["classifier", "generative"] | None = None
    # The decoder graphs' K/V (cross_*, past_*, present_*): `heads` [B, heads, tokens, head_dim]
    # (exports since the head-split cache) or `tokens` [B, tokens, heads * head_dim] (earlier ones:
    # a manifest without the field). The token axis is -2 in both; service/generation.py needs
    # neither, callers that make K/V arrays themselves use `kv_shape`.
    decoder_kv_layout: Literal["tokens", "heads"] = "tokens"
    itc_temperature: float
    # Re-ranking score = ITM log p(match) + this x ITC cosine (service.tasks.rerank_scores), calibrated
    # on validation; 0 (manifests without the field) ranks by the ITM head alone
    rerank_itc_weight: float = Field(0.0, ge=0)
    # What the model knows, in words: its training domain and what it cannot do (shown by /v1/models)
    description: str | None = None
    # Every word of the training texts (questions, answers, captions) as `service.preprocess.text_words`
    # splits them; a question word outside it is flagged in the response's warnings. None: only words
    # the tokenizer maps to [UNK] are flagged.
    known_words: list[str] | None = None
    levels: Levels | None = None  # levels.json content (service/levels.py), None if untrimmed
    metrics: dict = Field(default_factory=dict)  # measured, e.g. {"onnxruntime/int8": {"easy_vqa.accuracy": ...}}
    reference: Reference = Field(default_factory=Reference)
    files: dict[str, FileInfo] = Field(default_factory=dict)
    produced_by: dict = Field(default_factory=dict)  # command, source model, versions, git commit, time

    @property
    def vqa_mode(self) -> str | None:
        """classifier | generative | None (the model cannot answer questions)."""
        return self.vqa or ("classifier" if self.answers else None)

    def graph_file(self, graph: str, precision: str) -> str:
        info = self.graphs[graph]
        if precision in info.files:
            return info.files[precision]
        return info.files["fp32"] if "fp32" in info.files else next(iter(info.files.values()))

    def precisions(self) -> list[str]:
        return sorted({p for g in self.graphs.values() for p in g.files})


class ManifestError(ValueError):
    """A model folder that is not a valid, intact model (the message says which file and why)."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(folder: str | Path) -> dict[str, FileInfo]:
    """sha256 and size of every file in a version folder except the manifest and dotfiles
    (pipeline stamps)."""
    folder = Path(folder)
    return {
        p.relative_to(folder).as_posix(): FileInfo(sha256=sha256_file(p), bytes=p.stat().st_size)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST and not p.name.startswith(".")
    }


def load_manifest(folder: str | Path) -> Manifest:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{folder}: no {MANIFEST} (not an exported model; run `trimvlm export`)")
    try:
        return Manifest.model_validate_json(path.read_text())
    except ValueError as e:
        raise ManifestError(f"{path}: invalid manifest: {e}") from e


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    """Record every file's checksum, then write manifest.json atomically."""
    folder = Path(folder)
    manifest.files = file_table(folder)
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n")
    tmp.replace(folder / MANIFEST)
    return folder / MANIFEST


def version_key(version: str) -> tuple[int, str]:
    """Sort key of a version folder name: numbers in numeric order (9 before 10), after any name
    that is not a number."""
    return (int(version), "") if is_version_number(version) else (-1, version)


def is_version_number(version: str) -> bool:
    return version.isascii() and version.isdigit()


def latest(model_ids: Iterable[str]) -> str:
    """The highest version among `name/version` ids (numeric order)."""
    return max(model_ids, key=lambda mid: version_key(mid.rpartition("/")[2]))


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of each model in a repository are served, as Triton's version_policy:
    `latest:N` (the N highest version numbers, `latest:1` by default), `all`, or `specific:1,3`
    (those of the listed versions each model has). Only version folders named by a number are
    ever served (Triton ignores the others too); `trimvlm models list` shows what is served."""

    kind: Literal["latest", "all", "specific"] = "latest"
    latest: int = 1
    versions: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        kind, _, arg = text.strip().partition(":")
        kind, arg = kind.strip().lower(), arg.strip()
        usage = "latest:N (N >= 1), all, or specific:V1,V2,... (version numbers)"
        if kind == "all" and not arg:
            return cls("all")
        if kind == "latest" and (not arg or is_version_number(arg)):
            n = int(arg or 1)
            if n >= 1:
                return cls("latest", latest=n)
        if kind == "specific":
            listed = [v.strip() for v in arg.split(",")]
            if arg and all(is_version_number(v) for v in listed):
                return cls("specific", versions=tuple(sorted({int(v) for v in listed})))
        raise ValueError(f"version policy {text!r} not understood: {usage}")

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest:{self.latest}"
        if self.kind == "specific":
            return "specific:" + ",".join(map(str, self.versions))
        return "all"

    def select(self, versions: Iterable[str]) -> list[str]:
        """The served ones among one model's version folder names, in numeric order."""
        numbers = sorted((v for v in versions if is_version_number(v)), key=int)
        if self.kind == "latest":
            return numbers[-self.latest :]
        if self.kind == "specific":
            return [v for v in numbers if int(v) in self.versions]
        return numbers


def find_models(root: str | Path, policy: VersionPolicy | str | None = None) -> list[Path]:
    """Version folders holding a manifest under a repository root (`<name>/<version>/`), by name
    then version in numeric order; with a version policy only those it serves, for each name. A
    root that is itself a version folder is returned as it is (serving it was asked for)."""
    root = Path(root)
    if (root / MANIFEST).is_file():
        return [root]
    folders = sorted((p.parent for p in root.glob(f"*/*/{MANIFEST}")), key=lambda f: (f.parent.name, version_key(f.name)))
    if policy is None:
        return folders
    policy = VersionPolicy.parse(policy) if isinstance(policy, str) else policy
    by_name: dict[str, list[Path]] = {}
    for folder in folders:
        by_name.setdefault(folder.parent.name, []).append(folder)
    served: list[Path] = []
    for group in by_name.values():
        keep = set(policy.select(f.name for f in group))
        served += [f for f in group if f.name in keep]
    return served


def check_files(folder: str | Path, manifest: Manifest) -> list[str]:
    """Problems with the files: missing, altered (sha256) or unlisted graph files."""
    folder = Path(folder)
    problems = []
    for rel, info in manifest.files.items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != info.bytes or sha256_file(path) != info.sha256:
            problems.append(f"{rel}: checksum mismatch (the file was altered after export)")
    for name, graph in manifest.graphs.items():
        for precision, rel in graph.files.items():
            if rel not in manifest.files:
                problems.append(f"graph {name} ({precision}): {rel} is not in the manifest's file table")
    for rel in (manifest.tokenizer, manifest.reference.file):
        if rel not in manifest.files:
            problems.append(f"{rel}: not in the manifest's file table")
    return problems


def reference_key(graph: str, precision: str, tensor: str, kind: str) -> str:
    """Key of one array in reference.npz: in/<graph>/<tensor> or out/<graph>/<precision>/<tensor>."""
    return f"in/{graph}/{tensor}" if kind == "in" else f"out/{graph}/{precision}/{tensor}"


def output_mismatch(got: np.ndarray, recorded: np.ndarray, tol: float, rtol: float | None) -> str | None:
    """None when `got` reproduces `recorded` (max abs diff <= tol, or relative RMS error <= rtol
    where the precision has one), else how far apart they are."""
    delta = got.astype(np.float64) - recorded.astype(np.float64)
    diff = float(np.max(np.abs(delta), initial=0.0))
    if diff <= tol:
        return None
    if rtol is None:
        return f"{diff:.3g} > {tol:g}"
    rel = float(np.linalg.norm(delta) / max(float(np.linalg.norm(recorded.astype(np.float64))), 1e-12))
    if rel <= rtol:
        return None
    return f"{diff:.3g} > {tol:g} (relative RMS {rel:.3g} > {rtol:g})"


def check_outputs(folder: str | Path, manifest: Manifest, runtime_factory) -> list[str]:
    """Rerun every graph and precision on the recorded reference inputs; compare with the
    recorded outputs within the manifest's tolerance. runtime_factory(graphs) -> loaded Runtime."""
    folder = Path(folder)
    ref = np.load(folder / manifest.reference.file)
    problems = []
    for precision in manifest.precisions():
        files = {g: folder / info.files[precision] for g, info in manifest.graphs.items() if precision in info.files}
        try:
            runtime = runtime_factory(files)
        except Exception as e:  # a graph that does not load is a verification failure, not a crash
            problems.append(f"{precision}: graphs do not load: {e}")
            continue
        tol = manifest.reference.tolerance.get(precision, 1e-3)
        rtol = manifest.reference.relative_tolerance.get(precision)
        for graph in files:
            info = manifest.graphs[graph]
            feeds = {t.name: ref[reference_key(graph, precision, t.name, "in")] for t in info.inputs}
            got = runtime.run(graph, feeds)
            for t in info.outputs:
                key = reference_key(graph, precision, t.name, "out")
                if key not in ref:
                    problems.append(f"{graph} ({precision}): no recorded output {t.name}")
                    continue
                problem = output_mismatch(got[t.name], ref[key], tol, rtol)
                if problem:
                    problems.append(f"{graph} ({precision}): output {t.name} differs from the recorded one by {problem}")
        runtime.close()
    return problems


def verify(folder: str | Path, runtime_factory=None) -> list[str]:
    """Every problem with an exported model folder (empty list: intact and reproducing)."""
    try:
        manifest = load_manifest(folder)
    except ManifestError as e:
        return [str(e)]
    problems = check_files(folder, manifest)
    if problems:  # outputs of altered files would only repeat the checksum failure
        return problems
    if runtime_factory is None:
        from service.runtime import RuntimeOptions, load_runtime

        def runtime_factory(files):
            return load_runtime("onnxruntime", files, RuntimeOptions(), fallback=False)

    return check_outputs(folder, manifest, runtime_factory)


def summary(folder: str | Path) -> dict:
    """One line of `trimvlm models list`."""
    m = load_manifest(folder)
    size = sum(f.bytes for f in m.files.values())
    levels = sorted(m.levels.levels) if m.levels else ["full"]
    return {
        "model": f"{m.name}/{m.version}",
        "path": str(folder),
        "tasks": m.tasks,
        "graphs": sorted(m.graphs),
        "precisions": m.precisions(),
        "levels": levels,
        "size_mb": round(size / 2**20, 2),
        "metrics": m.metrics,
    }
