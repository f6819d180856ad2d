"""pytest-benchmark suites: every variant of benchmarks/variants.py, forward alone and forward +
backward, on the grid DMI_BENCH_GRID picks, CPU always and CUDA when present.

    pytest benchmarks/ --benchmark-only                    # the quick grid
    DMI_BENCH_GRID=full pytest benchmarks/ --benchmark-only --benchmark-json=out.json

Not part of the normal test run (pytest's testpaths is tests/); CI runs this file on the smoke
grid. For the side-by-side ratios use python -m benchmarks.report. The last tests run the report
and the per-stage table (benchmarks.kernels) on tiny budgets and check what they print, never
how fast anything was.
"""

import json
import sys

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


# ---- the report and the per-stage table run, and print what they promise (timings never asserted)

def test_report_training_step_section():
    from benchmarks import report

    steps = report.run_steps(budget_s=0.001)
    assert steps is not None, "the toolkit imports in the test environment"
    batches = sorted({steps["batch_size"], steps["dmi_batch_size"]})
    assert [(r["model"], r["batch"]) for r in steps["rows"]] == \
        [(m, b) for m in report.STEP_MODELS for b in batches]
    for r in steps["rows"]:
        assert r["rounds"] >= 5 and set(r["median_s"]) == {"cross-entropy", "L_DMI"}
        assert all(s > 0 for s in r["median_s"].values())
    text = "\n".join(report.step_section(steps))
    assert "## One training step" in text
    for b in batches:
        assert f"- L_DMI within 1.1x of CE for the MLP: batch {b}, L_DMI/CE = " in text
        assert f"| mlp | {b} |" in text and f"| cnn | {b} |" in text
    assert "- cnn, per sample at the toolkit's batch sizes" in text


def test_report_training_step_verdicts():
    """The verdict follows the ratio: fabricated medians, either side of the bound."""
    from benchmarks import report

    def steps(ratio):
        rows = [{"model": m, "batch": b, "rounds": 5,
                 "median_s": {"cross-entropy": 1e-3 * b / 128, "L_DMI": ratio * 1e-3 * b / 128}}
                for m in ("mlp", "cnn") for b in (128, 256)]
        return {"batch_size": 128, "dmi_batch_size": 256, "hidden": 128, "rows": rows}

    met = report.step_verdicts(steps(1.05))
    assert met.count("-> met") == 2 and "MISSED" not in met
    assert "L_DMI/CE = 1.05" in met  # per sample, CE at 128 and L_DMI at 256: the same ratio
    missed = report.step_verdicts(steps(1.32))
    assert missed.count("-> MISSED by 1.20x") == 2


def test_report_without_toolkit(monkeypatch):
    """The report still runs when the toolkit's optional dependencies are missing."""
    from benchmarks import report

    monkeypatch.setitem(sys.modules, "dmi_ext.toolkit.train", None)  # import raises ImportError
    assert report.run_steps(budget_s=0.001) is None
    assert "(skipped: the toolkit does not import)" in report.step_section(None)


def test_report_smoke_writes_section(tmp_path, capsys):
    from benchmarks import report

    report.main(["--smoke", "--budget", "0.005", "--out", str(tmp_path)])
    md = next(tmp_path.glob("report-cpu-smoke-*.md")).read_text()
    assert md == capsys.readouterr().out
    assert "## The contract's CPU rows" in md and "fused <= 1.3x the autograd floor" in md
    assert "## One training step" in md
    assert "- L_DMI within 1.1x of CE for the MLP: batch 128" in md
    data = json.loads(next(tmp_path.glob("report-cpu-smoke-*.json")).read_text())
    assert len(data["training_step"]["rows"]) == 4


def test_omp_note(monkeypatch):
    from benchmarks import report

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert report.omp_note() == ""
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert report.omp_note() == ", OMP_WAIT_POLICY=passive"


def test_kernels_tiny_shape(capsys):
    from benchmarks import kernels

    kernels.main(["--shapes", "64x4,32x3", "--threads", "1", "2", "--budget", "0.001"])
    out = capsys.readouterr().out
    for shape in ("N=64 C=4", "N=32 C=3"):
        assert shape in out
    for stage in (*kernels.STAGES, "fused", "cross-entropy"):
        rows = [line for line in out.splitlines() if line.startswith(f"| {stage} |")]
        assert len(rows) == 2, stage
        assert rows[0].count("|") == 1 + 1 + 3 * 2  # stage and three cells per thread count


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "64by4"], "argument --shapes: expected NxC"),
    (["--shapes", "64x1"], "got '64x1'"),
    (["--threads", "0"], "argument --threads: thread counts must be >= 1, got 0"),
    (["--budget", "0"], "argument --budget: must be > 0, got 0.0"),
])
def test_kernels_bad_arguments(argv, message, capsys):
    from benchmarks import kernels

    with pytest.raises(SystemExit):
        kernels.main(argv)
    assert message in capsys.readouterr().err


def test_kernels_callgrind_parser(monkeypatch):
    """inclusive_counts reads callgrind_annotate's inclusive listing: an entry point's count, not
    its lambda's; cross-entropy sums its binding and the engine's backward; a stage it cannot find
    is left out."""
    import subprocess

    from benchmarks import kernels

    listing = """--------------------------------------------------------------------------------
Ir
--------------------------------------------------------------------------------
1,000,000 (100.0%)  PROGRAM TOTALS
  129,539 (11.37%)  ???:dmi_ext::cpu::(anonymous namespace)::joint_cpu(at::Tensor const&, bool) [/x/_C.so]
  159,223 (13.98%)  ???:dmi_ext::cpu::(anonymous namespace)::dmi_backward_cpu(at::Tensor const&, long) [/x/_C.so]
  146,421 (12.85%)  ???:dmi_ext::cpu::(anonymous namespace)::dmi_backward_cpu(at::Tensor const&, long)::{lambda()#2}::operator()() const [/x/_C.so]
   70,116 ( 6.15%)  ???:dmi_ext::cpu::(anonymous namespace)::lu_loss_cpu(at::Tensor const&, double) [/x/_C.so]
  131,395 (30.17%)  ???:torch::autograd::python::PythonEngine::execute(std::vector<torch::autograd::Edge> const&) [/t/libtorch_python.so]
  118,149 (27.13%)  ???:torch::autograd::python::PythonEngine::execute_with_graph_task(int) [/t/libtorch_python.so]
   96,574 (22.18%)  ???:torch::autograd::THPVariable_cross_entropy_loss(_object*, _object*) [/t/libtorch_python.so]
"""

    def fake_run(cmd, **kwargs):
        assert cmd[:2] == ["callgrind_annotate", "--inclusive=yes"] and cmd[-1] == "dump"
        return subprocess.CompletedProcess(cmd, 0, stdout=listing, stderr="")

    monkeypatch.setattr(kernels.subprocess, "run", fake_run)
    assert kernels.inclusive_counts("dump") == {
        "joint": 129539, "lu_loss": 70116, "dmi_backward": 159223,
        "cross-entropy": 131395 + 96574}  # no dmi_cpu line: dmi left out
