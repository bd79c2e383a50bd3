"""service/machine.py: the one description of the machine every report carries."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from service.machine import cpu_name, machine_info


def test_facts_in_order_with_renames_and_extras():
    m = machine_info("cpu", "processor=cpu", "cpu_count=cores", "python", note="shared")
    assert list(m) == ["cpu", "processor", "cpu_count", "python", "note"]
    assert m["cpu"] == m["processor"] == cpu_name() and m["cpu"]
    assert m["cpu_count"] == os.cpu_count() and m["python"] == platform.python_version() and m["note"] == "shared"


def test_versions_of_the_libraries():
    import numpy as np
    import onnxruntime

    assert machine_info("numpy", "onnxruntime") == {"numpy": np.__version__, "onnxruntime": onnxruntime.__version__}


def test_unknown_fact_is_refused():
    with pytest.raises(ValueError, match="unknown machine fact 'gpu'"):
        machine_info("cpu", "gpu")
    with pytest.raises(ValueError, match="'nope'"):
        machine_info("x=nope")


def test_no_torch_unless_asked():
    code = (
        "import sys; from service.machine import machine_info; "
        "machine_info('cpu', 'cores', 'python', 'platform', 'onnxruntime'); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu sse2 avx2 fma", "AVX2, no VNNI"),
        ("avx2 avx512f avx512_vnni amx_int8", "AVX2, AVX-512, AVX512-VNNI, AMX-INT8"),
        ("avx2 avx_vnni", "AVX2, AVX-VNNI"),
    ],
)
def test_cpu_features_names_what_changes_int8_cost(monkeypatch, flags, expected):
    from pathlib import Path

    from service import machine

    real = Path.read_text
    monkeypatch.setattr(
        Path,
        "read_text",
        lambda p, *a, **k: f"model name : X\nflags\t\t: {flags}\n" if str(p) == "/proc/cpuinfo" else real(p, *a, **k),
    )
    assert machine.cpu_features() == expected
