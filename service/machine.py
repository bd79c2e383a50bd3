"""The machine a measurement ran on, described alike in every report (reports/*/report.json).

Here, the lowest layer, so that compression/ and benchmarks/ share it. torch is imported only when
a report asks for its version or thread count (compression/ and the model benchmark, which have it);
the service never does.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC 7B13"): /proc/cpuinfo on Linux, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# CPU features that change what INT8 and fp32 graphs cost (VNNI: INT8 dot products; AMX: tile matmuls)
_ISA_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI", "amx_int8": "AMX-INT8"}


def cpu_features() -> str:
    """The vector extensions /proc/cpuinfo lists among those that matter here ("AVX2, AVX-512,
    AVX512-VNNI"), "no VNNI" spelled out when neither VNNI is there; "" off Linux."""
    try:
        line = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return ""
    flags = set(line.split(":", 1)[-1].split())
    found = [name for flag, name in _ISA_FLAGS.items() if flag in flags]
    if found and not flags & {"avx512_vnni", "avx_vnni"}:
        found.append("no VNNI")
    return ", ".join(found)


def _version(module: str) -> Callable[[], str]:
    return lambda: __import__(module).__version__


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


FACTS: dict[str, Callable[[], object]] = {
    "cpu": cpu_name,
    "cpu_features": cpu_features,
    "cores": os.cpu_count,
    "threads": _torch_threads,  # torch's intra-op threads
    "python": platform.python_version,
    "platform": platform.platform,
    "numpy": _version("numpy"),
    "onnxruntime": _version("onnxruntime"),
    "torch": _version("torch"),
}


def machine_info(*facts: str, **extra: object) -> dict:
    """{key: value} for the named FACTS, in order, then `extra` (a note on the set-up, say).
    "key=fact" files a fact under another key, as older reports name them ("processor=cpu")."""
    out: dict = {}
    for spec in facts:
        key, _, fact = spec.partition("=")
        if (fact or key) not in FACTS:
            raise ValueError(f"unknown machine fact {fact or key!r} (known: {', '.join(FACTS)})")
        out[key] = FACTS[fact or key]()
    return {**out, **extra}
