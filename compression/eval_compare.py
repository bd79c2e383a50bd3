"""Paired comparison of two evaluations of the same test splits (`trimvlm eval --json ... --items`):
is a candidate model worse than the one it would replace, metric by metric, and is the
difference more than the test set's noise?

Each metric is a mean over items (questions, images, captions), and both models answered the same
items, so the comparison is paired: per metric it counts the items the candidate scores lower on
("lost") and higher on ("won") and applies the exact two-sided sign test to them (McNemar's exact
test when scores are 0/1). A drop of a few items out of thousands, with as many won elsewhere, is
what re-running the same comparison on other data would undo; a drop with a small p is not.

The verdict follows a rule: by default any metric below the base's counts as worse (the strict
rule); with `alpha`, only drops whose sign-test p is below it do. Metrics without per-item results
(an evaluation written without `--items`) are compared by value alone.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from compression.config_file import ConfigError
from compression.evaluate import flat_metrics

ITEMS_SUFFIX = ".items.npz"
# counts, settings, timings and chance levels describe the run, not the model's quality
_NOT_QUALITY = ("n", "vqa_n", "n_images", "n_texts", "rerank_k", "rerank_itc_weight", "eval_seconds", "limit")


def items_path(eval_json: str | Path) -> Path:
    """Where `trimvlm eval --json X.json --items` writes the per-item results: X.items.npz."""
    p = Path(eval_json)
    return p.with_name(p.stem + ITEMS_SUFFIX)


def save_items(eval_json: str | Path, items: dict[str, np.ndarray]) -> Path:
    path = items_path(eval_json)
    np.savez_compressed(path, **items)
    return path


def sign_test(lost: int, won: int) -> float:
    """Exact two-sided sign test: the probability, with lost + won changed items each equally likely
    to go either way, of a split at least as uneven as this one."""
    n = lost + won
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(lost, won) + 1))
    return min(1.0, 2 * tail / 2**n)


@dataclass
class MetricComparison:
    metric: str
    base: float
    candidate: float
    lost: int | None = None  # items the candidate scores lower on (None: no per-item results)
    won: int | None = None
    p: float | None = None  # sign test on lost vs won
    worse: bool = False  # under the comparison's rule

    @property
    def delta(self) -> float:
        return self.candidate - self.base


@dataclass
class Comparison:
    base: str
    candidate: str
    alpha: float | None  # None: any drop counts
    metrics: list[MetricComparison]

    @property
    def worse(self) -> list[MetricComparison]:
        return [m for m in self.metrics if m.worse]

    def to_json(self) -> dict:
        return {
            "base": self.base,
            "candidate": self.candidate,
            "rule": self.rule(),
            "worse": [m.metric for m in self.worse],
            "metrics": [asdict(m) | {"delta": m.delta} for m in self.metrics],
        }

    def rule(self) -> str:
        if self.alpha is None:
            return "a metric is worse when the candidate's value is below the base's"
        return f"a metric is worse when it is below the base's and the paired sign test gives p < {self.alpha}"


def _quality_metrics(results: dict) -> dict[str, float]:
    return {
        k: float(v) for k, v in flat_metrics(results).items() if k.split(".", 1)[1] not in _NOT_QUALITY and ".chance_" not in k
    }


def load_evaluation(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(results, per-item arrays) of an evaluation JSON; the arrays are {} without an items file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such evaluation (write one with trimvlm eval MODEL --json {path} --items)")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not JSON ({err})") from None
    if not isinstance(results, dict) or not _quality_metrics(results):
        raise ConfigError(f"{path}: no metrics in it (is it the JSON of trimvlm eval?)")
    items = items_path(path)
    if not items.is_file():
        return results, {}
    try:
        with np.load(items) as data:
            return results, {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ConfigError(f"{items}: unreadable per-item results ({err})") from None


def compare(base: str | Path, candidate: str | Path, alpha: float | None = None) -> Comparison:
    """Every quality metric the two evaluations share, base against candidate, with the sign test
    where both have per-item results. Evaluations of different item sets (another `--limit`, another
    split) cannot be paired: that is an error, not a comparison."""
    if alpha is not None and not 0 < alpha < 1:
        raise ConfigError(f"alpha must be between 0 and 1, got {alpha}")
    base_results, base_items = load_evaluation(base)
    cand_results, cand_items = load_evaluation(candidate)
    if base_results.get("limit") != cand_results.get("limit"):
        raise ConfigError(
            f"the evaluations cover different items (limit {base_results.get('limit')} vs {cand_results.get('limit')})"
        )
    a, b = _quality_metrics(base_results), _quality_metrics(cand_results)
    shared = [k for k in a if k in b]
    if not shared:
        raise ConfigError(f"{base} and {candidate} share no metric")
    for key in sorted(k for k in base_items.keys() & cand_items.keys() if k.endswith(".items_digest")):
        if str(base_items[key]) != str(cand_items[key]):
            section = key.removesuffix(".items_digest")
            raise ConfigError(f"{section}: {base} and {candidate} were evaluated on different test items")
    rows = []
    for k in shared:
        row = MetricComparison(k, a[k], b[k])
        if k in base_items and k in cand_items:
            x, y = base_items[k], cand_items[k]
            if x.shape != y.shape:
                raise ConfigError(f"{k}: {len(x)} items in {base} but {len(y)} in {candidate}: not the same test set")
            row.lost, row.won = int(np.sum(y < x)), int(np.sum(y > x))
            row.p = sign_test(row.lost, row.won)
        # without per-item results a drop cannot be tested, so the strict rule applies to it
        tested = alpha is not None and row.p is not None
        row.worse = row.delta < 0 and (row.p < alpha if tested else True)
        rows.append(row)
    return Comparison(str(base), str(candidate), alpha, rows)


def comparison_table(c: Comparison) -> str:
    """Markdown: one row per metric, with the items lost / won and the sign test's p."""
    lines = [
        f"base: `{c.base}`  ",
        f"candidate: `{c.candidate}`  ",
        f"rule: {c.rule()}",
        "",
        "| metric | base | candidate | change | items lost / won | sign test p | verdict |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for m in c.metrics:
        counts = "" if m.lost is None else f"{m.lost} / {m.won}"
        p = "" if m.p is None else f"{m.p:.3g}"
        verdict = "worse" if m.worse else ("lower, within noise" if m.delta < 0 else "")
        lines.append(f"| {m.metric} | {m.base:.4f} | {m.candidate:.4f} | {m.delta:+.4f} | {counts} | {p} | {verdict} |")
    worse = c.worse
    lines += ["", f"worse: {', '.join(m.metric for m in worse)}" if worse else "no metric is worse"]
    return "\n".join(lines)
