"""Benchmark suite options: DMI_BENCH_GRID=smoke|quick|full picks the shapes (default quick)."""

import os

import pytest
import torch

from benchmarks import variants

GRID = os.environ.get("DMI_BENCH_GRID", "quick")
GRIDS = {"smoke": variants.smoke_grid, "quick": variants.quick_grid, "full": variants.full_grid}
if GRID not in GRIDS:
    raise pytest.UsageError(f"DMI_BENCH_GRID must be one of {sorted(GRIDS)}, got {GRID!r}")
SHAPES = GRIDS[GRID]()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
