"""``python -m dmi_ext`` end to end, in a subprocess, on tiny grids (seconds, not minutes)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--hidden", "16", "--ce-epochs", "2", "--gce-epochs", "2", "--fw-epochs", "1",
        "--lccn-epochs", "1", "--dmi-epochs", "2", "--no-progress"]


def run_cli(*args):
    # cwd = the repository root, so this checkout's dmi_ext is the one imported
    return subprocess.run([sys.executable, "-m", "dmi_ext", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_reproduce_tiny_grid_writes_json_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "grid"
    done = run_cli("reproduce", "--noise", "pairflip", "uniform", "binary3", "--rates", "0.0",
                   "0.7", "--seeds", "1", "--out", str(out), *TINY)
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert len(runs) == 3 * 2 * 5  # noise kinds x rates x methods, one seed
    # r = 0 is the same clean setting for both 10-class kinds: trained once, reported twice
    clean = {kind: [run["test_accuracy"] for run in runs
                    if run["noise"] == kind and run["rate"] == 0.0] for kind in ("pairflip",
                                                                                 "uniform")}
    assert clean["pairflip"] == clean["uniform"]
    assert all(run["train_noise_rate"] > 0.5 for run in runs
               if run["noise"] == "uniform" and run["rate"] == 0.7)
    assert {run["method"] for run in runs} == {"ce", "fw", "gce", "lccn", "dmi"}
    assert all(math.isfinite(run["test_accuracy"]) for run in runs)
    assert {run["dataset"] for run in runs if run["noise"] == "binary3"} == {"digits-binary"}
    assert results["summary"]["pairflip"]["0.7"]["dmi"]["n"] == 1
    assert results["config"]["dmi_epochs"] == 2
    table = (out / "results.md").read_text()
    assert "| r | realised | CE | FW | GCE | LCCN | DMI |" in table
    assert "binary case (3)" in table and "| 0.7 |" in table
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(out / "results.md") in done.stdout


def test_train_prints_mean_and_std_and_writes_json(tmp_path):
    out = tmp_path / "train.json"
    done = run_cli("train", "--method", "fw", "--noise", "uniform", "--rate", "0.3",
                   "--seeds", "2", "--out", str(out), *TINY)
    assert done.returncode == 0, done.stderr
    assert "seed 0: test accuracy" in done.stdout and "seed 1: test accuracy" in done.stdout
    assert "fw on digits, noise uniform r = 0.3: test accuracy" in done.stdout
    assert "over 2 seeds" in done.stdout
    written = json.loads(out.read_text())
    assert [run["seed"] for run in written["runs"]] == [0, 1]
    assert np.allclose(np.sum(written["transition"], axis=1), 1.0)
    reported = float(done.stdout.split("test accuracy")[-1].split("±")[0])
    assert reported == pytest.approx(np.mean([r["test_accuracy"] for r in written["runs"]]),
                                     abs=0.01)


@pytest.mark.parametrize("name, content, message", [
    ("bad.csv", "1,2,0\n3,x,1\n", "bad.csv: line 2: 'x' is not a number"),
    ("objects.npz", None, "holds Python objects"),
    ("table.xlsx", "", "'data' must be one of"),
])
def test_bad_data_file_is_a_clear_error_not_a_traceback(tmp_path, capsys, name, content, message):
    # In-process: the file is rejected before anything is trained or torch is configured.
    from dmi_ext.toolkit.cli import main

    path = tmp_path / name
    if content is None:
        np.savez(path, X=np.zeros((4, 2)), y=np.array([0, 1, None, 1], dtype=object))
    else:
        path.write_text(content)
    assert main(["train", "--data", str(path), "--noise", "none", *TINY]) == 2
    assert message in capsys.readouterr().err
