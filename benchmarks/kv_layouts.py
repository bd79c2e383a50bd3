"""Old vs new decoder K/V layout, interleaved call by call in one process: 40-token greedy captions
at batch 1 with and without the KV cache, over two exports of the same BLIP-base fixture (the
`tokens` layout of runs/scale and the head-split `heads` layout of a re-export), fp32 and INT8.

    python -m benchmarks.kv_layouts OLD_EXPORT NEW_EXPORT --out reports/scale/kv-layouts.json

Both exports get the same image states (the old export's vision graph), so the four runners of a
precision differ only in their decoder graphs. A shared machine's load lands on all of them alike.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.scale import DECODER, Graphs, images, interleaved, load, p50, sep_masked
from service.generation import greedy_decode
from service.machine import machine_info
from service.settings import Settings


def measure(old: Path, new: Path, precisions: tuple[str, ...], length: int, repeats: int) -> dict:
    options = Settings(batch_concurrency=1).runtime_options()  # one graph call at a time, every core
    out = {}
    for p in precisions:
        graphs = {"tokens": Graphs(old, p, ["vision", *DECODER], options), "heads": Graphs(new, p, DECODER, options)}
        g0 = graphs["tokens"]
        tok = g0.manifest.tokens
        states = g0.run("vision", {"pixel_values": g0.pixels(images(g0.manifest.preprocessing.image.size, 1))})["image_states"]
        calls = {}
        for layout, g in graphs.items():
            run = sep_masked(g.run, tok.sep)
            for cache in (True, False):
                ids = (tok.bos, tok.sep, tok.pad)
                calls[f"{layout}/{'cache' if cache else 'nocache'}"] = lambda run=run, cache=cache, x=states, ids=ids: (
                    greedy_decode(run, x, *ids, max_length=length, use_cache=cache)
                )
        times = interleaved(calls, repeats)
        row = {k: p50(v) for k, v in times.items()}
        out[p] = {
            "p50_ms": row,
            "speedup": {lay: round(row[f"{lay}/nocache"] / row[f"{lay}/cache"], 3) for lay in graphs},
            "cached_ms_per_token": {lay: round(row[f"{lay}/cache"] / length, 2) for lay in graphs},
            "cache_heads_vs_tokens": round(row["tokens/cache"] / row["heads/cache"], 3),
            "timed_calls": {k: len(v) for k, v in times.items()},
        }
        for g in graphs.values():
            g.close()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", type=Path, help="export with the `tokens` K/V layout")
    p.add_argument("new", type=Path, help="export with the `heads` K/V layout")
    p.add_argument("--precisions", default="fp32,int8")
    p.add_argument("--length", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("reports/scale/kv-layouts.json"))
    a = p.parse_args(argv)
    t0, before = time.time(), load()
    result = {
        "command": "python -m benchmarks.kv_layouts " + " ".join(argv or __import__("sys").argv[1:]),
        "machine": machine_info("cpu", "cores", "onnxruntime"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_before": before,
        "length": a.length,
        "batch": 1,
        "precisions": measure(a.old, a.new, tuple(a.precisions.split(",")), a.length, a.repeats),
    }
    result |= {"load_after": load(), "wall_s": round(time.time() - t0, 1)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["precisions"], indent=2))


if __name__ == "__main__":
    main()
