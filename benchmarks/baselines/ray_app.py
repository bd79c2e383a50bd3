"""Ray Serve serving the service's TaskModel (benchmarks/baselines/vqa_model.py) on POST /vqa: one
replica, `@serve.batch` with batches of up to 32 and a 2 ms window (max_ongoing_requests raised so a
replica can hold full batches; Ray's default of 5 would cap the batch at 5). Ray's HTTP proxy, its
controller and the replica are Ray actors in processes of their own. Access logs off.

Run: TRIMVLM_PEER_MODEL=models/trimvlm-default/1 python -m benchmarks.baselines.ray_app --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import threading

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network calls from an offline benchmark

import ray  # noqa: E402
from ray import serve  # noqa: E402
from starlette.requests import Request  # noqa: E402

from benchmarks.baselines.vqa_model import VqaModel  # noqa: E402

MAX_BATCH = int(os.environ.get("PEER_MAX_BATCH_SIZE", "32"))
WAIT_S = float(os.environ.get("PEER_BATCH_TIMEOUT_MS", "2")) / 1000


@serve.deployment(max_ongoing_requests=4 * MAX_BATCH)
class VqaDeployment:
    def __init__(self):
        self.model = VqaModel()

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=WAIT_S)
    async def infer(self, items):
        # ONNX Runtime releases the GIL: off the replica's event loop, so requests keep arriving meanwhile
        return await asyncio.get_running_loop().run_in_executor(None, self.model.infer, items)

    async def __call__(self, request: Request) -> dict:
        return await self.infer(self.model.decode(await request.json()))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=8001)
    a = p.parse_args()
    ray.init(include_dashboard=False, object_store_memory=100 * 2**20, log_to_driver=False, logging_level="warning")
    serve.start(http_options={"host": "127.0.0.1", "port": a.port})
    logging_config = {"log_level": "WARNING", "enable_access_log": False}
    serve.run(VqaDeployment.bind(), route_prefix="/vqa", logging_config=logging_config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
