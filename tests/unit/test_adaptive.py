"""`auto`'s level choice: per-level safety margins calibrated from prediction errors, and the
request wait that must not time out before its deadline (uvloop's timers can fire early)."""

import asyncio
import re
import time
from types import SimpleNamespace

import numpy as np
import pytest

from service.adaptive import CannotMeetDeadline, LatencyModel, LevelOption, PredictionErrors, choose_level, level_margins
from service.errors import ServiceError
from service.levels import Level
from service.routes.common import wait


def test_latency_model_equals_least_squares_over_its_window():
    """The running-sums fit is the least-squares line of the last `window` batches, through many
    evictions (and the periodic re-sum)."""
    rng = np.random.default_rng(0)
    model, seen = LatencyModel(window=40), []
    for _ in range(300):
        n = int(rng.integers(1, 33))
        t = 0.0008 * n + 0.003 + float(rng.normal(0, 2e-4))
        model.observe("vqa/full", n, t)
        seen.append((n, t))
    window = np.array(seen[-40:])
    a, b = np.polyfit(window[:, 0], window[:, 1], 1)
    assert model.predict("vqa/full", 1) == pytest.approx(a + b, rel=1e-9)
    assert model.predict("vqa/full", 32) == pytest.approx(32 * a + b, rel=1e-9)


def test_latency_model_one_batch_size_is_a_proportional_share():
    model = LatencyModel()
    model.observe("caption", 4, 0.008)
    model.observe("caption", 4, 0.012)
    assert model.predict("caption", 8) == pytest.approx(0.02)
    assert model.predict("never-seen", 8) == 0.0


def test_prediction_errors_default_until_enough_samples():
    errors = PredictionErrors(min_samples=50, default=1.2)
    for _ in range(49):
        errors.observe(0.001, 0.003)
    assert errors.factor() == 1.2
    errors.observe(0.001, 0.003)
    assert errors.factor() == pytest.approx(3.0)


def test_a_level_without_enough_requests_borrows_the_largest_calibrated_margin():
    """`auto` seldom picks some levels; until they have min_samples of their own they take the
    jitter the calibrated levels see on this host, never less than the default."""
    noisy, quiet, cold = (PredictionErrors(min_samples=10, default=1.2) for _ in range(3))
    for _ in range(10):
        noisy.observe(0.001, 0.0018)
        quiet.observe(0.001, 0.0011)
    cold.observe(0.001, 0.005)  # one sample is not a calibration
    margins = level_margins({"full": noisy, "balanced": quiet, "fast": cold})
    assert margins == pytest.approx({"full": 1.8, "balanced": 1.1, "fast": 1.8})
    assert level_margins({"full": quiet, "fast": cold}) == pytest.approx({"full": 1.1, "fast": 1.2})
    assert level_margins({"fast": cold}) == {"fast": 1.2}  # nothing calibrated: the default


def test_prediction_errors_is_a_high_quantile_clipped():
    rng = np.random.default_rng(0)
    ratios = rng.uniform(0.5, 2.0, size=512)
    errors = PredictionErrors(quantile=0.99)
    for r in ratios:
        errors.observe(0.002, 0.002 * r)
    assert errors.factor() == pytest.approx(np.quantile(ratios, 0.99))
    # faster than predicted never shrinks the margin below 1
    fast = PredictionErrors(min_samples=1)
    fast.observe(0.010, 0.001)
    assert fast.factor() == 1.0
    # one wild outlier stream is capped, so auto never refuses everything because of noise
    wild = PredictionErrors(min_samples=1, max_factor=4.0)
    wild.observe(0.001, 1.0)
    assert wild.factor() == 4.0
    # the window forgets old errors
    recent = PredictionErrors(window=100, min_samples=1)
    for _ in range(100):
        recent.observe(0.001, 0.003)
    for _ in range(100):
        recent.observe(0.001, 0.0011)
    assert recent.factor() == pytest.approx(1.1)
    # nonsense observations are ignored
    recent.observe(0.0, 1.0)
    recent.observe(0.001, -1.0)
    assert len(recent) == 100


def _options(full_s, full_safety, balanced_s, balanced_safety):
    return [
        LevelOption("balanced", Level(), 0.99, balanced_s, balanced_safety),
        LevelOption("full", Level(), 1.0, full_s, full_safety),
    ]


def test_choose_level_uses_each_levels_own_margin():
    # full is predicted to fit (4 ms < 5 ms) but its predictions run 1.5x late: balanced it is
    opt, reason = choose_level(_options(0.004, 1.5, 0.002, 1.1), 0.005)
    assert (opt.name, reason) == ("balanced", "deadline")
    # with tight predictions full fits
    opt, reason = choose_level(_options(0.004, 1.1, 0.002, 1.1), 0.005)
    assert (opt.name, reason) == ("full", "fits")
    # no deadline: the most accurate
    assert choose_level(_options(1.0, 4.0, 1.0, 4.0), None)[0].name == "full"


def test_choose_level_refuses_when_no_margin_fits():
    with pytest.raises(CannotMeetDeadline) as e:
        choose_level(_options(0.004, 1.1, 0.002, 2.0), 0.0035)
    # the message names the fastest level (lowest predicted time), with its margin
    assert "no compute level fits in the remaining 3.5 ms" in str(e.value)
    assert "the fastest level, balanced, is predicted to take 2.0 ms (4.0 ms with its x2.00 margin)" in str(e.value)


def test_refusal_names_the_fastest_level_and_never_a_negative_time():
    # full needs least with its margin (6.8 x 1.0) but fast is predicted fastest (2.1 ms): fast is named
    options = [
        LevelOption("full", Level(flops_ratio=1.0), 1.0, 0.0068, 1.0),
        LevelOption("fast", Level(flops_ratio=0.3), 0.9, 0.0021, 4.0),
        LevelOption("balanced", Level(flops_ratio=0.4), 0.95, 0.0030, 4.0),
    ]
    with pytest.raises(CannotMeetDeadline) as e:
        choose_level(options, 0.001)
    assert e.value.fastest.name == "fast"
    assert "the fastest level, fast, is predicted to take 2.1 ms (8.4 ms with its x4.00 margin)" in str(e.value)
    # the deadline already gone (a tiny negative remainder once printed as "-0.0 ms")
    with pytest.raises(CannotMeetDeadline) as e:
        choose_level(options, -0.00001)
    assert str(e.value).startswith("the deadline had already passed when the compute level was chosen; the fastest level, fast")
    assert "-" not in str(e.value)


def test_server_level_options_do_not_count_preprocessing(monkeypatch):
    """`auto` picks after preprocessing: its prediction is the queue plus its own batch only."""
    from service.server import ModelServer

    srv = ModelServer.__new__(ModelServer)
    srv.levels = {"full": Level(flops_ratio=1.0), "balanced": Level(flops_ratio=0.4, min_accuracy=0.99)}
    srv.prediction_errors = {"full": PredictionErrors(), "balanced": PredictionErrors(min_samples=1)}
    srv.prediction_errors["balanced"].observe(0.001, 0.0011)
    srv.batchers = {
        "vqa/full": SimpleNamespace(predicted_wait_s=lambda: 0.004),
        "vqa/balanced": SimpleNamespace(predicted_wait_s=lambda: 0.002),
    }
    srv.latency = SimpleNamespace(predict=lambda key, n: 1.0)  # a large preprocess prediction must not be added
    opts = {o.name: o for o in srv.level_options()}
    assert opts["full"].predicted_s == 0.004 and opts["full"].safety == 1.2  # the default: balanced's 1.1 is less
    assert opts["balanced"].predicted_s == 0.002 and opts["balanced"].safety == pytest.approx(1.1)
    srv.prediction_errors["balanced"].observe(0.001, 0.0019)
    assert {o.name: o.safety for o in srv.level_options()} == pytest.approx({"full": 1.9, "balanced": 1.9}, rel=0.01)
    srv.record_outcome("full", 0.004, 0.008)
    assert len(srv.prediction_errors["full"]) == 1


def _fake_request():
    async def receive():  # a client that stays connected
        await asyncio.sleep(3600)

    metrics = SimpleNamespace(queue_duration=SimpleNamespace(labels=lambda *a: SimpleNamespace(observe=lambda s: None)))
    app = SimpleNamespace(state=SimpleNamespace(trimvlm=SimpleNamespace(metrics=metrics)))
    return SimpleNamespace(app=app, receive=receive, state=SimpleNamespace(t0=time.perf_counter(), deadline_ms=3.0))


@pytest.mark.parametrize("loop_factory", ["asyncio", "uvloop"])
def test_wait_never_times_out_before_the_deadline(loop_factory):
    if loop_factory == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        new_loop = uvloop.new_event_loop
    else:
        new_loop = asyncio.new_event_loop

    async def one(delay_s):
        fut = asyncio.get_running_loop().create_future()  # never completed: only the deadline ends it
        deadline = time.perf_counter() + delay_s
        # a busy loop iteration before the wait makes the cached loop clock stale (the uvloop case)
        t = time.perf_counter()
        while time.perf_counter() - t < 0.002:
            pass
        with pytest.raises(ServiceError) as e:
            await wait(_fake_request(), fut, deadline)
        assert e.value.status == 504
        assert re.fullmatch(  # the deadline and the time spent, in all and waiting (here: since the request began)
            r"deadline of 3 ms passed before the answer was ready: the request had spent [\d.]+ ms in all,"
            r" [\d.]+ ms of it waiting for the model",
            e.value.message,
        ), e.value.message
        assert fut.cancelled()
        return time.perf_counter() - deadline

    async def many():
        return [await one(d) for d in (0.003, 0.005, 0.0035) * 10]

    loop = new_loop()
    try:
        late = loop.run_until_complete(many())
    finally:
        loop.close()
    assert min(late) >= 0.0, f"timed out {-1000 * min(late):.3f} ms before the deadline"


def test_wait_returns_result_before_deadline():
    async def go():
        fut = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.001, fut.set_result, ("answer", 0.0))
        return await wait(_fake_request(), fut, time.perf_counter() + 1.0)

    assert asyncio.run(go()) == ("answer", 0.0)  # the result and the time it spent queued


def test_margin_quantile_is_a_validated_setting(monkeypatch):
    from pydantic import ValidationError

    from service.settings import Settings

    monkeypatch.setenv("TRIMVLM_AUTO_MARGIN_QUANTILE", "0.999")
    assert Settings().auto_margin_quantile == 0.999
    for bad in ("0.3", "1.5", "high"):
        monkeypatch.setenv("TRIMVLM_AUTO_MARGIN_QUANTILE", bad)
        with pytest.raises(ValidationError):
            Settings()
