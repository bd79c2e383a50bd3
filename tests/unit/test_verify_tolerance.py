"""`models verify` on another machine: INT8 outputs move with the CPU's integer kernels (AVX2 vs
VNNI) by about 1% while a different graph moves them by far more; fp32 stays strict."""

from __future__ import annotations

import numpy as np

from service.repository import Reference, output_mismatch


def test_int8_passes_a_kernel_sized_difference_and_fails_a_different_graph():
    rng = np.random.default_rng(0)
    recorded = rng.normal(0, 2.5, (2, 18)).astype(np.float32)
    ref = Reference()
    tol, rtol = ref.tolerance["int8"], ref.relative_tolerance["int8"]
    kernels = recorded + rng.normal(0, 0.02, recorded.shape).astype(np.float32)  # max ~0.06, relative RMS ~1%
    assert np.abs(kernels - recorded).max() > tol
    assert output_mismatch(kernels, recorded, tol, rtol) is None
    other_graph = recorded + 1.0
    assert "relative RMS" in output_mismatch(other_graph, recorded, tol, rtol)
    assert output_mismatch(rng.normal(0, 2.5, recorded.shape), recorded, tol, rtol) is not None


def test_fp32_has_no_relative_allowance():
    recorded = np.linspace(-3, 3, 50, dtype=np.float32)
    ref = Reference()
    assert "fp32" not in ref.relative_tolerance
    assert output_mismatch(recorded + 1e-5, recorded, ref.tolerance["fp32"], None) is None
    assert output_mismatch(recorded + 1e-3, recorded, ref.tolerance["fp32"], None) == "0.001 > 0.0001"
