"""LitServe serving the service's TaskModel (benchmarks/baselines/vqa_model.py) on POST /vqa, batches
of up to 32 with a 2 ms window; everything else LitServe's defaults (an API server process, one
inference worker process that decodes, batches, predicts and encodes). Per-request logging off.

Run: TRIMVLM_PEER_MODEL=models/trimvlm-default/1 python -m benchmarks.baselines.litserve_app --port 8001
"""

from __future__ import annotations

import argparse

import litserve as ls

from benchmarks.baselines.vqa_model import VqaModel


class VqaAPI(ls.LitAPI):
    def setup(self, device):
        self.model = VqaModel()

    def decode_request(self, request):
        return self.model.decode(request)

    def batch(self, inputs):
        return inputs  # VqaModel stacks and pads its items itself

    def predict(self, items):
        return self.model.infer(items)

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        return output


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-timeout-ms", type=float, default=2.0)
    p.add_argument("--timeout-s", type=float, default=120.0)
    a = p.parse_args()
    api = VqaAPI(max_batch_size=a.max_batch_size, batch_timeout=a.batch_timeout_ms / 1000, api_path="/vqa")
    server = ls.LitServer(api, accelerator="cpu", timeout=a.timeout_s)
    server.run(host="127.0.0.1", port=a.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
