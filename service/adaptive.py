"""Adaptive compute: pick a compute level per request from its deadline and the current queues.

Latency per (batcher, batch size) is fitted online as t(n) = a*n + b by least squares over the
most recent batches (BentoML's CorkDispatcher fits the same line), seeded at warm-up so the first
request already has a prediction. `auto` runs after preprocessing and takes the most accurate
level whose predicted completion (queue ahead + its own batch), times a safety factor, fits the
remaining deadline; when none does, the request is refused at once (503) instead of being
queued to fail. Each level's safety factor is calibrated online (PredictionErrors): a high
quantile of actual/predicted over its recent requests, so it is as tight as its predictions.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

from service.errors import ServiceError
from service.levels import Level


class LatencyModel:
    """Per key: t(n) = a*n + b from the last `window` (n, seconds) observations.

    Least squares from running sums (count, sum n, sum t, sum n^2, sum n*t) kept as observations
    enter and leave the window: a prediction costs O(1) however often batches land (every request
    at low load), where refitting the window each time cost ~0.2 ms on the event loop."""

    def __init__(self, window: int = 256):
        self.window = window
        self._obs: dict[str, deque] = {}
        self._sums: dict[str, list[float]] = {}
        self._evicted: dict[str, int] = {}
        self._lock = threading.Lock()

    def observe(self, key: str, n: int, seconds: float) -> None:
        with self._lock:
            obs = self._obs.setdefault(key, deque())
            sums = self._sums.setdefault(key, [0.0] * 5)
            if len(obs) >= self.window:
                old_n, old_t = obs.popleft()
                self._add(sums, old_n, old_t, -1.0)
                self._evicted[key] = self._evicted.get(key, 0) + 1
                if self._evicted[key] >= self.window:  # re-sum now and then: no float drift
                    self._evicted[key] = 0
                    sums[:] = [0.0] * 5
                    for o in obs:
                        self._add(sums, *o, 1.0)
            obs.append((n, seconds))
            self._add(sums, n, seconds, 1.0)

    @staticmethod
    def _add(sums: list[float], n: float, t: float, sign: float) -> None:
        sums[0] += sign
        sums[1] += sign * n
        sums[2] += sign * t
        sums[3] += sign * n * n
        sums[4] += sign * n * t

    def _line(self, key: str) -> tuple[float, float]:
        with self._lock:
            sums = self._sums.get(key)
            if not sums or sums[0] <= 0:
                return 0.0, 0.0
            return self._solve(*sums)

    @staticmethod
    def _solve(count: float, sn: float, st: float, snn: float, snt: float) -> tuple[float, float]:
        var_n = count * snn - sn * sn  # batch sizes are integers: exact, 0 iff one size seen
        if var_n <= 0:  # one batch size seen: proportional share, no intercept
            return max(st / max(sn, count), 0.0), 0.0
        a = (count * snt - sn * st) / var_n
        b = (st - a * sn) / count
        return max(a, 0.0), max(b, 0.0)

    def predict(self, key: str, n: int) -> float:
        a, b = self._line(key)
        return a * max(n, 0) + b

    def snapshot(self) -> dict[str, dict]:
        out = {}
        for key in list(self._obs):
            a, b = self._line(key)
            out[key] = {"a_ms_per_item": round(1000 * a, 4), "b_ms": round(1000 * b, 4), "n_obs": len(self._obs[key])}
        return out


class PredictionErrors:
    """Recent actual/predicted time ratios; `factor()` is their `quantile` (a split-conformal
    bound: a new request exceeds factor * prediction with probability ~1 - quantile), clipped to
    [1, max_factor], and `default` until `min_samples` ratios are in."""

    def __init__(
        self, quantile: float = 0.99, window: int = 512, min_samples: int = 50, default: float = 1.2, max_factor: float = 4.0
    ):
        self.quantile, self.min_samples, self.default, self.max_factor = quantile, min_samples, default, max_factor
        self._ratios: deque = deque(maxlen=window)
        self._factor: float | None = None
        self._lock = threading.Lock()

    def observe(self, predicted_s: float, actual_s: float) -> None:
        if predicted_s > 0 and actual_s >= 0:
            with self._lock:
                self._ratios.append(actual_s / predicted_s)
                self._factor = None

    @property
    def calibrated(self) -> bool:
        return len(self._ratios) >= self.min_samples

    def factor(self, fallback: float | None = None) -> float:
        """Before `min_samples`: the larger of `default` and `fallback` (another level's margin)."""
        with self._lock:
            if not self.calibrated:
                return self.default if fallback is None else max(self.default, fallback)
            if self._factor is None:
                q = float(np.quantile(np.fromiter(self._ratios, float), self.quantile))
                self._factor = min(max(q, 1.0), self.max_factor)
            return self._factor

    def __len__(self) -> int:
        return len(self._ratios)


def level_margins(errors: dict[str, PredictionErrors]) -> dict[str, float]:
    """Each level's safety factor. A level without enough requests of its own yet (one `auto`
    seldom picks) borrows the largest calibrated level's: the levels share the host's jitter, and
    on a busy machine the fixed default covers far less of it than 1 - quantile."""
    calibrated = [e.factor() for e in errors.values() if e.calibrated]
    fallback = max(calibrated) if calibrated else None
    return {level: e.factor(fallback) for level, e in errors.items()}


@dataclass
class LevelOption:
    name: str
    point: Level  # thresholds and flops_ratio
    accuracy: float  # calibrated min accuracy across splits: the ordering key
    predicted_s: float  # predicted time to finish if queued now
    safety: float = 1.2  # margin on predicted_s (PredictionErrors.factor of this level)

    @property
    def needs_s(self) -> float:
        return self.predicted_s * self.safety


class CannotMeetDeadline(ServiceError):
    """No level's prediction (times its margin) fits the time left (503 `deadline_unreachable`: the
    request is refused at once); `remaining_s` may be <= 0 (the deadline passed before a level was
    chosen). The message names the fastest level, the one with the lowest predicted time; routes
    that know the request's deadline say more (routes.common)."""

    def __init__(self, remaining_s: float, options: list[LevelOption]):
        self.remaining_s, self.options = remaining_s, options
        self.fastest = min(options, key=lambda o: (o.predicted_s, o.needs_s)) if options else None
        if remaining_s <= 0:
            head = "the deadline had already passed when the compute level was chosen"
        else:
            head = f"no compute level fits in the remaining {1000 * remaining_s:.1f} ms"
        super().__init__("deadline_unreachable", 503, f"{head}{self.fastest_detail()}", {"Retry-After": "1"})

    def fastest_detail(self) -> str:
        """'; the fastest level, fast, is predicted to take 2.1 ms (2.5 ms with its x1.20 margin)'."""
        f = self.fastest
        if f is None:
            return ""
        return (
            f"; the fastest level, {f.name}, is predicted to take {1000 * f.predicted_s:.1f} ms"
            f" ({1000 * f.needs_s:.1f} ms with its x{f.safety:.2f} margin)"
        )


def choose_level(options: list[LevelOption], remaining_s: float | None) -> tuple[LevelOption, str]:
    """The most accurate option predicted to finish within `remaining_s` (times its safety factor
    for prediction error, see PredictionErrors); with no deadline, the most accurate. Levels are ordered by compute (full first):
    each was calibrated as the cheapest point within its allowed accuracy drop, so more FLOPs
    means at least as accurate (calibration noise can invert tiny differences; that must not
    put a trimmed level above full). Returns (option, reason)."""
    ranked = sorted(options, key=lambda o: (-o.point.flops_ratio, -o.accuracy))
    if remaining_s is None:
        return ranked[0], "no_deadline"
    for opt in ranked:
        if opt.needs_s <= remaining_s:
            return opt, "deadline" if opt is not ranked[0] else "fits"
    raise CannotMeetDeadline(remaining_s, options)
