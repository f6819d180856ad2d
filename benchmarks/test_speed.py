"""pytest-benchmark suites: every variant of benchmarks/variants.py, forward alone and forward +
backward, on the grid DMI_BENCH_GRID picks, CPU always and CUDA when present.

    pytest benchmarks/ --benchmark-only                    # the quick grid
    DMI_BENCH_GRID=full pytest benchmarks/ --benchmark-only --benchmark-json=out.json

Not part of the normal test run (pytest's testpaths is tests/). For the side-by-side ratios use
python -m benchmarks.report.
"""

import pytest
import torch

from benchmarks import variants
from benchmarks.conftest import DEVICES, SHAPES


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name.replace(" ", ","))
@pytest.mark.parametrize("variant", list(variants.VARIANTS))
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_speed(benchmark, device, shape, variant, mode):
    z, y = shape.make(device)
    fn = variants.VARIANTS[variant]
    benchmark.group = f"{device} {shape.name} {mode}"
    benchmark.extra_info.update(N=shape.N, C=shape.C, B=shape.B, M=shape.M, device=device)
    if mode == "forward":
        def run():
            with torch.no_grad():
                out = fn(z, y)
            _sync(device)
            return out
    else:
        z.requires_grad_(True)

        def run():
            z.grad = None
            loss = fn(z, y)
            loss.backward()
            _sync(device)
            return loss
    loss = benchmark(run)
    assert loss.numel() == 1


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name.replace(" ", ","))
def test_variants_agree(shape):
    """The timed variants compute the same loss, so the timings compare like with like."""
    if shape.elements > variants.AGREEMENT_MAX_ELEMENTS:
        pytest.skip(f"{shape.elements} elements: too large to compare against native in float64")
    variants.check_agreement(shape)
