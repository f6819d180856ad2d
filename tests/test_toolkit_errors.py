"""The CLI mistakes a careless user makes: each is refused (or warned about) before any training,
in one line that names the flag at fault."""

import time

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from dmi_ext.toolkit.cli import main, noise_warning  # noqa: E402
from dmi_ext.toolkit.data import DataNote, load_dataset  # noqa: E402
from dmi_ext.toolkit.noise import uniform_noise_matrix  # noqa: E402

TINY = ["--hidden", "8", "--ce-epochs", "1", "--dmi-epochs", "1", "--seeds", "1",
        "--no-progress"]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    # once blamed --nproc ("1 processes share every batch")
    (["--dmi-batch-size", "0"], "argument --dmi-batch-size must be >= 1, got 0"),
    (["--batch-size", "-3"], "argument --batch-size must be >= 1, got -3"),
    # once failed only after the CE warm-up
    (["--dmi-lr", "-1"], "argument --dmi-lr must be > 0, got -1.0"),
    (["--ce-lr", "nan"], "argument --ce-lr must be > 0, got nan"),
    (["--ce-epochs", "-1"], "argument --ce-epochs must be >= 0, got -1"),
    (["--layers", "0"], "argument --layers must be >= 1, got 0"),
    (["--weight-decay", "-0.1"], "argument --weight-decay must be >= 0"),
    (["--gce-q", "0"], "argument --gce-q must be in (0, 1]"),
    (["--val-fraction", "0.5", "--test-fraction", "0.5"], "--val-fraction + --test-fraction"),
    # once failed after all the training
    (["--out", "/nonexistent/dir/x.json"], "argument --out: directory '/nonexistent/dir' does "
                                            "not exist"),
    (["--save-model", "/nonexistent/dir/m.pt"], "argument --save-model: directory"),
])
def test_bad_settings_fail_before_training_naming_the_flag(capsys, argv, message):
    start = time.perf_counter()
    assert main(["train", "--method", "dmi", "--noise", "pairflip", *TINY, *argv]) == 2
    line = error_line(capsys)
    assert line.startswith("error: ") and message in line
    assert time.perf_counter() - start < 5  # nothing was trained


@pytest.mark.parametrize("text", ["abc", "1.5", "nan"])
def test_bad_rate_says_what_a_rate_is(capsys, text):
    with pytest.raises(SystemExit):
        main(["train", "--rate", text])
    line = error_line(capsys)
    assert f"argument --rate: a noise rate must be a number in [0, 1], got '{text}'" in line
    assert "_rate" not in line


def test_reproduce_out_that_cannot_be_a_directory_fails_first(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["reproduce", "--noise", "binary3", "--rates", "0.7", "--seeds", "1",
                 "--out", str(blocker / "sub"), *TINY[:-3]]) == 2
    assert "argument --out: cannot create directory" in error_line(capsys)


def test_nproc_check_comes_after_the_batch_sizes_are_valid(capsys):
    assert main(["train", "--nproc", "4", "--dmi-batch-size", "2", *TINY]) == 2
    assert "argument --nproc: 4 processes share every batch" in error_line(capsys)


def test_binary_noise_on_a_ten_class_file_fails_before_training(tmp_path, capsys):
    path = tmp_path / "three.npz"
    np.savez(path, X=np.random.default_rng(0).normal(size=(60, 4)), y=np.arange(60) % 3)
    assert main(["reproduce", "--data", str(path), "--noise", "binary3", "--rates", "0.5",
                 "--seeds", "1", "--out", str(tmp_path / "out"), *TINY[:-3]]) == 2
    assert "argument --noise: noise 'binary3' is for 2 classes, the data has 3" \
        in error_line(capsys)


def test_singular_or_anti_informative_noise_is_warned_about():
    assert noise_warning(uniform_noise_matrix(10, 0.5), "uniform", 0.5) is None
    singular = noise_warning(uniform_noise_matrix(10, 0.9), "uniform", 0.9)
    assert "singular" in singular and "invertible T" in singular
    above = noise_warning(uniform_noise_matrix(2, 0.7), "uniform", 0.7)
    assert "above (C - 1) / C = 0.5" in above and "permutation" in above
    T = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    assert "singular" in noise_warning(T, "matrix", 0.0)


def test_the_warning_reaches_the_user_and_training_goes_on(capsys):
    assert main(["train", "--method", "ce", "--data", "digits-binary", "--noise", "uniform",
                 "--rate", "0.8", *TINY]) == 0
    captured = capsys.readouterr()
    assert "warning: --noise uniform --rate 0.8: above (C - 1) / C = 0.5" in captured.err
    assert "test accuracy" in captured.out


def pandas_style_csv(path, rows: int = 30, sort_by_class: bool = True):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], rows // 3) if sort_by_class else rng.integers(3, size=rows)
    x = rng.normal(size=(rows, 2))
    lines = [",f0,f1,label"] + [f"{k},{a:.4f},{b:.4f},{c}" for k, ((a, b), c)
                                 in enumerate(zip(x, y))]
    path.write_text("\n".join(lines) + "\n")
    return x


def test_pandas_index_column_is_dropped_with_a_note(tmp_path):
    path = tmp_path / "wine.csv"
    x = pandas_style_csv(path)
    with pytest.warns(DataNote, match="dropped the first column"):
        data = load_dataset(str(path))
    assert data.x.shape == (30, 2)
    np.testing.assert_allclose(data.x, x, atol=1e-4)


def test_a_named_first_column_or_a_non_index_is_kept(tmp_path):
    path = tmp_path / "named.csv"
    path.write_text("id,f1,label\n0,0.5,0\n1,0.25,1\n2,0.75,0\n3,0.1,1\n")
    assert load_dataset(str(path)).x.shape == (4, 2)  # a named column is the user's call
    path.write_text(",f1,label\n3,0.5,0\n1,0.25,1\n2,0.75,0\n0,0.1,1\n")
    assert load_dataset(str(path)).x.shape == (4, 2)  # not 0, 1, 2, ... in order


def test_the_note_is_printed_by_the_cli(tmp_path, capsys):
    path = tmp_path / "wine.csv"
    pandas_style_csv(path, rows=60)
    assert main(["train", "--method", "ce", "--data", str(path), "--noise", "none",
                 *TINY]) == 0
    assert f"note: {path}: dropped the first column" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")
def test_device_cuda_without_a_gpu_is_a_clear_error(capsys):
    assert main(["train", "--device", "cuda", *TINY]) == 2
    line = error_line(capsys)
    assert "argument --device: 'cuda' asked for, but torch" in line and "sees no GPU" in line


def test_nproc_on_cuda_needs_a_gpu_per_process(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["train", "--device", "cuda", "--nproc", "2", *TINY]) == 2
    assert "argument --nproc: 2 processes on --device cuda need 2 GPUs, torch sees 1" \
        in error_line(capsys)
