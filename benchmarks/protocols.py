"""What each protocol adds over /vqa: one server, one client, the same image and question sent as
/vqa (JSON, base64), OpenAI chat completion (JSON, data URI), KServe v2 infer (JSON, base64) and KServe
v2 infer with the image as binary data (Triton's binary data extension), interleaved request by request
(the order rotates each round), p50 of each and its ratio to /vqa's p50.

The client is the load generator's raw keep-alive HTTP/1.1 client (benchmarks/loadgen.py) for all four,
so the figures are the server's cost of each protocol (parsing, validation, response shaping), not the
cost of the protocols' client libraries.

    python -m benchmarks.protocols --out reports/protocols --rounds 300     (or: trimvlm bench protocols)
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import statistics
import time
from pathlib import Path

from PIL import Image, ImageDraw

from benchmarks.loadgen import RawClient, percentile
from benchmarks.service_bench import ServerProcess
from service.machine import machine_info

QUESTION = "what shape is in the image?"
VARIANTS = ("vqa", "chat_completions", "v2_infer_json", "v2_infer_binary")


def image_png(size: int = 64) -> bytes:
    img = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(img).ellipse((size * 0.2, size * 0.2, size * 0.8, size * 0.8), fill=(255, 0, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def requests_for(png: bytes, model: str = "trimvlm-default") -> dict[str, tuple[str, bytes, dict[str, str]]]:
    """variant -> (path, body, extra headers): the same image, question and compute level (full) in each."""
    b64 = base64.b64encode(png).decode()
    vqa = {"image": b64, "question": QUESTION, "compute": "full"}
    chat = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}},
                    {"type": "text", "text": QUESTION},
                ],
            }
        ],
        "trimvlm": {"compute": "full"},
    }
    v2_json = {
        "inputs": [
            {"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]},
            {"name": "question", "shape": [1], "datatype": "BYTES", "data": [QUESTION]},
        ],
        "parameters": {"compute": "full"},
    }
    q = QUESTION.encode()
    image_bytes = len(png).to_bytes(4, "little") + png
    question_bytes = len(q).to_bytes(4, "little") + q
    header = {
        "inputs": [
            {"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(image_bytes)}},
            {"name": "question", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": len(question_bytes)}},
        ],
        "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in ("answer", "score")],
        "parameters": {"compute": "full"},
    }
    head = json.dumps(header).encode()
    infer = f"/v2/models/{model}/infer"
    return {
        "vqa": ("/vqa", json.dumps(vqa).encode(), {}),
        "chat_completions": ("/v1/chat/completions", json.dumps(chat).encode(), {}),
        "v2_infer_json": (infer, json.dumps(v2_json).encode(), {}),
        "v2_infer_binary": (
            infer,
            head + image_bytes + question_bytes,
            {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"},
        ),
    }


def raw_request(client: RawClient, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    fields = [f"POST {path} HTTP/1.1", f"Host: {client.host}:{client.port}", f"Content-Length: {len(body)}"]
    fields += [f"{k}: {v}" for k, v in {"Content-Type": "application/json", **headers}.items()]
    return ("\r\n".join(fields) + "\r\n\r\n").encode() + body


async def measure(url: str, rounds: int, warmup: int = 20) -> dict[str, list[float]]:
    """ms per request per variant, one client, interleaved (the order rotates each round)."""
    reqs = requests_for(image_png())
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    async with RawClient(url) as client:
        for r in range(warmup + rounds):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for v in order:
                path, body, headers = reqs[v]
                t0 = time.perf_counter()
                status, _, content = await client._exchange(raw_request(client, path, body, headers))
                dt = 1000 * (time.perf_counter() - t0)
                if status != 200:
                    raise RuntimeError(f"{v}: {status} {content[:300]!r}")
                if r >= warmup:
                    times[v].append(dt)
    return times


def summarise(times: dict[str, list[float]]) -> dict:
    p50 = {v: percentile(sorted(t), 50) for v, t in times.items()}
    return {
        v: {
            "requests": len(t),
            "p50_ms": round(p50[v], 3),
            "p90_ms": round(percentile(sorted(t), 90), 3),
            "mean_ms": round(statistics.fmean(t), 3),
            "p50_ratio_to_vqa": round(p50[v] / p50["vqa"], 3),
            "p50_added_ms": round(p50[v] - p50["vqa"], 3),
        }
        for v, t in times.items()
    }


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Protocol overhead over /vqa (1 client)",
        "",
        f"One server (`{report['model']}`, defaults), one keep-alive client, {report['rounds']} interleaved rounds; "
        f"{m['cpu']} ({m['cores']} cores), python {m['python']}, onnxruntime {m['onnxruntime']}. `{report['command']}`",
        "",
        "| request | p50 ms | p90 ms | p50 / /vqa p50 | p50 added ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for v, s in report["results"].items():
        ratio, added = s["p50_ratio_to_vqa"], s["p50_added_ms"]
        lines.append(f"| {v} | {s['p50_ms']:.2f} | {s['p90_ms']:.2f} | **{ratio:.3f}x** | {added:+.2f} |")
    return "\n".join(lines) + "\n"


def run(out: Path, rounds: int = 300, models: Path = Path("models"), url: str | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    server = None if url else ServerProcess(models, {"TRIMVLM_DEMO_PAGE": "false"})
    try:
        times = asyncio.run(measure(url or server.url, rounds))
    finally:
        if server is not None:
            server.stop()
    report = {
        "rounds": rounds,
        "model": "trimvlm-default",
        "machine": machine_info("cpu", "cores", "python", "onnxruntime"),
        "command": f"python -m benchmarks.protocols --out {out} --rounds {rounds}",
        "results": summarise(times),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "REPORT.md").write_text(markdown(report))
    return report


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("reports/protocols"))
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--models", type=Path, default=Path("models"))
    p.add_argument("--url", default=None, help="a running server instead of starting one")
    a = p.parse_args()
    print(markdown(run(a.out, a.rounds, a.models, a.url)))
