"""mosec serving the service's TaskModel (benchmarks/baselines/vqa_model.py) on POST /vqa: mosec's
Rust HTTP server, a preprocessing worker process (JSON, base64/PNG decoding, tokenising) and an
inference worker process batching up to 32 items with a 2 ms window (mosec's documented pipeline
shape: one worker per stage, tensors handed over by IPC). Per-request logging off.

Run: TRIMVLM_PEER_MODEL=models/trimvlm-default/1 python -m benchmarks.baselines.mosec_app --port 8001
(mosec reads its own flags from the command line: --port, --address, --timeout in ms, --log-level)
"""

from __future__ import annotations

import os

from mosec import Server, Worker

from benchmarks.baselines.vqa_model import VqaDecoder, VqaModel, inference_workers, model_folder

MAX_BATCH = int(os.environ.get("PEER_MAX_BATCH_SIZE", "32"))
WAIT_MS = int(os.environ.get("PEER_BATCH_TIMEOUT_MS", "2"))


class Preprocess(Worker):
    def __init__(self):
        super().__init__()
        self.decoder = VqaDecoder(model_folder())

    def forward(self, data: dict):
        return self.decoder.decode(data)


class Inference(Worker):
    def __init__(self):
        super().__init__()
        self.model = VqaModel()

    def forward(self, data: list) -> list:
        return self.model.infer(data)


if __name__ == "__main__":
    server = Server()
    server.append_worker(Preprocess, num=1, route="/vqa")
    server.append_worker(Inference, num=inference_workers(), max_batch_size=MAX_BATCH, max_wait_time=WAIT_MS, route="/vqa")
    server.run()
