"""The batcher (service/batching.py): batches leave full or after the delay, dropped and late items
never run, a failing batch fails only its items, `concurrency` batches run at once, and stop drains."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.adaptive import LatencyModel
from service.batching import Batcher, DeadlineExceeded, QueueFull


def make(run, executor, **kw) -> Batcher:
    return Batcher("test", run, executor, LatencyModel(), **kw)


def test_full_batches_under_load_and_results_in_order():
    sizes: list[int] = []

    def run(items):
        sizes.append(len(items))
        time.sleep(0.02)
        return [x * 10 for x in items]

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = make(run, ex, max_batch=4, max_delay_s=0.0)
            b.start()
            futs = [b.submit(i) for i in range(10)]
            done = await asyncio.gather(*futs)
            await b.stop(1.0)
            return [d[0] for d in done]

    assert asyncio.run(main()) == [i * 10 for i in range(10)]
    assert sizes == [4, 4, 2]  # all queued before the loop ran: full batches, then the rest


def test_delay_holds_a_batch_open_for_late_items():
    sizes: list[int] = []

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = make(lambda items: sizes.append(len(items)) or items, ex, max_batch=8, max_delay_s=0.05)
            b.start()
            first = b.submit(1)
            await asyncio.sleep(0.01)
            second = b.submit(2)  # within the first item's delay: same batch
            await asyncio.gather(first, second)
            await b.stop(1.0)

    asyncio.run(main())
    assert sizes == [2]


def test_cancelled_and_late_items_are_not_run():
    ran: list[int] = []

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = make(lambda items: ran.extend(items) or items, ex, max_batch=8, max_delay_s=0.0)
            gone = b.submit(1)
            gone.cancel()
            late = b.submit(2, deadline=time.perf_counter() - 1)
            live = b.submit(3)
            b.start()
            assert (await live)[0] == 3
            with pytest.raises(DeadlineExceeded):
                await late
            await b.stop(1.0)

    asyncio.run(main())
    assert ran == [3]


def test_a_failing_batch_fails_its_items_only():
    def run(items):
        if 0 in items:
            raise RuntimeError("backend failed")
        return items

    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = make(run, ex, max_batch=1, max_delay_s=0.0)
            b.start()
            bad, good = b.submit(0), b.submit(1)
            with pytest.raises(RuntimeError):
                await bad
            assert (await good)[0] == 1
            await b.stop(1.0)

    asyncio.run(main())


@pytest.mark.parametrize("concurrency", [1, 2])
def test_concurrency_bounds_batches_in_flight(concurrency):
    lock, active, peak = threading.Lock(), [0], [0]

    def run(items):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.03)
        with lock:
            active[0] -= 1
        return items

    async def main():
        with ThreadPoolExecutor(4) as ex:
            b = make(run, ex, max_batch=1, max_delay_s=0.0, concurrency=concurrency)
            b.start()
            await asyncio.gather(*(b.submit(i) for i in range(6)))
            assert b.running_batch == 0 and b.batches_running == 0
            await b.stop(1.0)

    asyncio.run(main())
    assert peak[0] == concurrency


def test_queue_bound_and_stop_drains():
    async def main():
        with ThreadPoolExecutor(1) as ex:
            b = make(lambda items: (time.sleep(0.01), items)[1], ex, max_batch=1, max_delay_s=0.0, max_queue=3)
            futs = [b.submit(i) for i in range(3)]
            with pytest.raises(QueueFull):
                b.submit(3)
            b.start()
            await b.stop(5.0)  # graceful: the queued items are answered before it returns
            assert all(f.done() and not f.cancelled() for f in futs)
            with pytest.raises(QueueFull):  # closing: refused
                b.submit(4)

    asyncio.run(main())


def test_predicted_wait_counts_waves_of_concurrent_batches():
    latency = LatencyModel()
    for n in (1, 8):
        latency.observe("test", n, 0.001 * n + 0.01)  # a*n + b
    one = Batcher("test", lambda items: items, None, latency, max_batch=8, max_delay_s=0.0, concurrency=1)
    two = Batcher("test", lambda items: items, None, latency, max_batch=8, max_delay_s=0.0, concurrency=2)
    # 16 items ahead: two full batches, one after the other, or side by side
    assert two.predicted_wait_s(16) == pytest.approx(one.predicted_wait_s(16) / 2, rel=0.05)
