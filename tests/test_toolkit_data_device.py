"""Your own data everywhere (files for reproduce, a clean test file, saved models, curves in the
JSON), the device plumbing (tested on the CPU; on a GPU when there is one) and the decision rule."""

import json
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

import dmi_ext  # noqa: E402
from dmi_ext.toolkit import decision  # noqa: E402
from dmi_ext.toolkit.cli import main  # noqa: E402
from dmi_ext.toolkit.data import (Dataset, align_test_set, default_pairs, load_dataset,  # noqa
                                  make_splits, noise_transition)
from dmi_ext.toolkit.methods import new_model, run_method  # noqa: E402
from dmi_ext.toolkit.models import build_model  # noqa: E402
from dmi_ext.toolkit.train import Batches, TrainConfig, process_device, resolve_device  # noqa

TINY = ["--hidden", "8", "--ce-epochs", "2", "--gce-epochs", "1", "--fw-epochs", "1",
        "--lccn-epochs", "1", "--dmi-epochs", "2", "--no-progress"]


def blobs(path, classes=(3, 5, 9), rows=90, seed=0, fmt="npz"):
    """Well-separated Gaussian blobs, labelled with the given values."""
    rng = np.random.default_rng(seed)
    y = np.array(classes)[np.arange(rows) % len(classes)]
    x = rng.normal(size=(rows, 4)) + 3.0 * (np.arange(rows) % len(classes))[:, None]
    if fmt == "npz":
        np.savez(path, X=x, y=y)
    else:
        np.savetxt(path, np.column_stack([x, y]), delimiter=",", fmt="%.5f")
    return x, y


def test_train_on_a_three_class_file_with_the_default_noise(tmp_path, capsys):
    # once: "argument 'pairs' has class 7 in (7, 1), outside [0, 3)"
    path = tmp_path / "three.npz"
    blobs(path)
    assert main(["train", "--data", str(path), "--seeds", "1", *TINY]) == 0
    assert "dmi on three.npz, noise pairflip r = 0.7" in capsys.readouterr().out
    assert default_pairs(load_dataset(str(path))) == ((0, 1), (2, 0))
    assert default_pairs(load_dataset("digits")) == ((7, 1), (3, 8), (5, 6), (4, 9))


def test_reproduce_on_a_file_runs_the_noise_kinds_that_fit(tmp_path):
    path = tmp_path / "three.csv"
    blobs(path, fmt="csv")
    out = tmp_path / "grid"
    assert main(["reproduce", "--data", str(path), "--rates", "0.0", "0.4", "--seeds", "1",
                 "--methods", "ce", "dmi", "--out", str(out), *TINY]) == 0
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["summary"]) == ["pairflip", "uniform"]  # no binary kinds for 3
    assert {run["dataset"] for run in results["runs"]} == {"three.csv"}
    assert results["dmi_ext_version"] == dmi_ext.__version__
    assert results["grid"]["pairs"] == [[0, 1], [2, 0]]
    assert "pair flips 0→1, 2→0 (three.csv)" in (out / "results.md").read_text()
    dmi = next(run for run in results["runs"] if run["method"] == "dmi")
    # per-epoch curves: the start (index 0) and every epoch of each phase
    assert [len(phase["val_criterion"]) for phase in dmi["phases"]] == [3, 3]
    assert dmi["phases"][1]["train_loss"][0] is None


def test_a_clean_test_file_is_the_test_set(tmp_path, capsys):
    train, test = tmp_path / "train.npz", tmp_path / "test.npz"
    blobs(train, rows=90)
    blobs(test, classes=(5, 9), rows=40, seed=1)  # fewer classes: numbered as in train.npz
    out = tmp_path / "run.json"
    assert main(["train", "--method", "ce", "--data", str(train), "--test-data", str(test),
                 "--noise", "none", "--seeds", "1", "--out", str(out), *TINY]) == 0
    data, held_out = load_dataset(str(train)), load_dataset(str(test))
    aligned = align_test_set(data, held_out)
    assert set(aligned.y.tolist()) == {1, 2}  # 5 and 9 are classes 1 and 2 of train.npz
    splits = make_splits(data, np.eye(3), 0, test=aligned)
    assert len(splits.test.y) == 40 and len(splits.train.y) + len(splits.val.y) == 90
    assert json.loads(out.read_text())["test_data"] == str(test)


def test_a_test_file_with_an_unknown_class_or_shape_is_refused(tmp_path, capsys):
    train, test = tmp_path / "train.npz", tmp_path / "test.npz"
    blobs(train)
    blobs(test, classes=(3, 4))
    assert main(["train", "--data", str(train), "--test-data", str(test), *TINY]) == 2
    assert "argument --test-data: 'test.npz' has label 4" in capsys.readouterr().err
    np.savez(test, X=np.zeros((10, 5)), y=np.arange(10) % 3 * 3)
    assert main(["train", "--data", str(train), "--test-data", str(test), *TINY]) == 2
    assert "has samples of shape (5,), the training data (4,)" in capsys.readouterr().err


def test_save_model_writes_models_that_predict_as_tested(tmp_path):
    path = tmp_path / "three.npz"
    x, y = blobs(path)
    saved = tmp_path / "model.pt"
    out = tmp_path / "run.json"
    assert main(["train", "--method", "dmi", "--data", str(path), "--noise", "none",
                 "--seeds", "2", "--save-model", str(saved), "--out", str(out),
                 "--dmi-rule", "auto", *TINY]) == 0
    checkpoint = torch.load(saved, weights_only=False)
    assert checkpoint["seeds"] == [0, 1] and checkpoint["class_names"] == ["3", "5", "9"]
    assert checkpoint["dmi_ext_version"] == dmi_ext.__version__
    config = TrainConfig(**checkpoint["config"])
    first = checkpoint["models"][0]
    model = build_model(config.model, (4,), 3, config.hidden, config.layers)
    model.load_state_dict(first["state_dict"])
    # Its test accuracy, from the raw features and the saved scaling, is the one reported.
    data = load_dataset(str(path))
    splits = make_splits(data, np.eye(3), 0, inputs=config.inputs)
    raw = data.x[np.isin(np.arange(90), _test_rows(data, splits))]
    scaled = (raw - first["feature_shift"]) / first["feature_scale"]
    predicted = model(torch.as_tensor(scaled, dtype=torch.float32)).argmax(1)
    written = json.loads(out.read_text())
    accuracy = 100.0 * float((predicted == splits.test.y).double().mean())
    assert accuracy == pytest.approx(written["runs"][0]["test_accuracy"])
    assert written["runs"][0]["decision"]["labels_per_entry"] > 0
    assert len(written["runs"][0]["phases"][0]["val_criterion"]) == 3


def _test_rows(data, splits):
    from dmi_ext.toolkit.data import stratified_indices

    return stratified_indices(data.y, 0.2, 0.2, 0)[2]


def test_device_resolution(monkeypatch):
    assert resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(ValueError, match="argument --device: 'cuda' asked for"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="argument --device must be one of"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == "cuda"
    assert process_device("cuda") == torch.device("cuda", 0)


def test_splits_model_and_batches_land_on_the_chosen_device(monkeypatch):
    # 'meta' stands in for a GPU: tensors there have shapes but no data, so anything left
    # behind on the CPU shows up as a device mismatch.
    import dmi_ext.toolkit.methods as methods

    monkeypatch.setattr(methods, "process_device", lambda name: torch.device("meta"))
    data = load_dataset("digits-binary")
    splits = make_splits(data, noise_transition("binary3", 2, 0.5), 0).to("meta")
    for part in (splits.train, splits.val, splits.test):
        assert {t.device.type for t in (part.x, part.y, part.clean_y)} == {"meta"}
    assert splits.to("meta") is splits  # already there: no copy
    model = new_model(splits, TrainConfig(hidden=8), seed=0)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    x, y, index = next(iter(Batches(splits.train.x, splits.train.y, 64, seed=0)))
    assert index.device.type == "meta" and x.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("method", ["ce", "fw", "lccn", "dmi"])
def test_every_method_trains_on_the_gpu(method):
    data = load_dataset("digits")
    splits = make_splits(data, noise_transition("pairflip", 10, 0.5), 0)
    config = TrainConfig(device="cuda", hidden=16, ce_epochs=2, fw_epochs=1, lccn_epochs=1,
                         dmi_epochs=2, dmi_rule="auto")
    result = run_method(method, splits, config, seed=0)
    assert next(result.model.parameters()).is_cuda
    assert 0.0 <= result.test_accuracy <= 100.0


def binary_case3_scores(rate=0.7, n=400, seed=0):
    """A model that ranks perfectly but whose arg-max answers 'class 0' too often, and case (3)
    noisy labels: the situation the rule is for."""
    rng = np.random.default_rng(seed)
    clean = (rng.random(n) > 0.1).astype(int)
    margin = np.where(clean == 1, rng.uniform(-1.5, 3.0, n), rng.uniform(-3.0, -1.6, n))
    scores = np.stack([np.zeros(n), margin], axis=1)
    noisy = np.where((clean == 1) & (rng.random(n) < rate), 0, clean)
    return scores, noisy, clean


def test_the_rule_recovers_the_threshold_from_noisy_labels_only():
    scores, noisy, clean = binary_case3_scores()
    assert (scores.argmax(1) == clean).mean() < 0.8
    chosen = decision.choose_offsets(scores, noisy)
    assert chosen.applied and chosen.gain > 0.1
    assert ((scores + chosen.offsets).argmax(1) == clean).mean() > 0.97


def test_the_rule_leaves_a_good_arg_max_alone_and_auto_needs_labels():
    rng = np.random.default_rng(1)
    clean = rng.integers(3, size=300)
    scores = np.eye(3)[clean] * 4.0 + rng.normal(size=(300, 3)) * 0.3
    chosen = decision.choose_offsets(scores, clean)
    assert not chosen.applied and (chosen.offsets == 0).all()
    scores, noisy, _ = binary_case3_scores(n=80)
    assert not decision.choose_offsets(scores, noisy, min_labels_per_entry=25).applied


def test_auto_refuses_offsets_whose_T_hat_turns_the_classifier_around():
    # Noisy labels that disagree with the scores: the fitted offsets 'gain' only through a T̂
    # with a negative determinant, which the paper's noise never has (det T = 1 - r).
    rng = np.random.default_rng(0)
    m = rng.uniform(-3, 3, 400)
    noisy = np.where(rng.random(400) < 0.8, m < 0.5, m >= 0.5).astype(int)
    scores = np.stack([np.zeros(400), m], axis=1)
    raw = decision.choose_offsets(scores, noisy)
    assert raw.applied and raw.gain > 0.02 and raw.det_T_hat < 0
    guarded = decision.choose_offsets(scores, noisy, positive_det=True)
    assert not guarded.applied and (guarded.offsets == 0).all()
    scores, noisy, _ = binary_case3_scores()
    assert decision.choose_offsets(scores, noisy, positive_det=True).applied


def test_the_threshold_rule_recovers_the_cut_from_noisy_labels_only():
    scores, noisy, clean = binary_case3_scores()
    assert (scores.argmax(1) == clean).mean() < 0.8
    chosen = decision.choose_threshold(scores, noisy)
    assert ((scores + chosen.offsets).argmax(1) == clean).mean() > 0.97
    # The change point lands in the empty band between the classes; the Gaussian mixture, fitted
    # to clusters that are uniform, cuts inside class 1, where the margins are dense: the rule
    # keeps the change point.
    assert -1.6 < chosen.change_point < -1.5 and chosen.mixture > 0.0
    assert chosen.chosen == "change-point"
    # Validation labels of one class say nothing about where the classes part: the arg-max.
    alone = decision.choose_threshold(scores, np.zeros(len(noisy), dtype=int))
    assert alone.chosen == "argmax" and (alone.offsets == 0).all()
    # A diverged model's NaN or infinite score leaves nothing to rank by: the arg-max, no warning.
    for bad in (np.nan, np.inf):
        broken = scores.copy()
        broken[7, 1] = bad
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert decision.choose_threshold(broken, noisy).chosen == "argmax"


def test_the_change_point_sits_where_the_label_rate_changes():
    rng = np.random.default_rng(3)
    m = np.sort(rng.uniform(-4, 4, 500))
    clean = (m > 1.0).astype(int)
    # Symmetric noise at 25 %: the noisy labels alone still change rate at the cut.
    noisy = np.where(rng.random(500) < 0.25, 1 - clean, clean)
    t = decision.change_point_threshold(m, noisy)
    assert abs(t - 1.0) < 0.5
    assert decision.change_point_threshold(np.zeros(10), noisy[:10]) is None  # nothing to cut


def test_the_mixture_finds_the_crossing_of_two_label_emitting_clusters():
    rng = np.random.default_rng(4)
    clean = (rng.random(600) > 0.2).astype(int)
    m = np.where(clean == 1, rng.normal(2.0, 1.0, 600), rng.normal(-2.0, 1.0, 600))
    noisy = np.where((clean == 1) & (rng.random(600) < 0.6), 0, clean)  # case (3), r = 0.6
    t = decision.mixture_threshold(m, noisy)
    # The crossing of 0.2 N(-2, 1) and 0.8 N(2, 1) is at -log(4) / 4 = -0.35.
    assert abs(t + 0.35) < 0.4
    # Class 1 left of class 0 is no fit the rule can use.
    assert decision.mixture_threshold(-m, 1 - noisy) is not None
    assert decision.mixture_threshold(np.ones(5), np.array([0, 1, 0, 1, 0])) is None


def test_the_threshold_rule_keeps_the_estimate_in_the_sparser_place(monkeypatch):
    rng = np.random.default_rng(5)
    m = np.concatenate([rng.normal(-3, 0.3, 100), rng.normal(3, 0.3, 300)])
    scores = np.stack([np.zeros_like(m), m], axis=1)
    noisy = (m > 0).astype(int)
    monkeypatch.setattr(decision, "change_point_threshold", lambda m, y: 3.0)  # dense
    monkeypatch.setattr(decision, "mixture_threshold", lambda m, y: 0.0)  # the valley
    chosen = decision.choose_threshold(scores, noisy)
    assert chosen.chosen == "mixture" and chosen.threshold == 0.0
    monkeypatch.setattr(decision, "mixture_threshold", lambda m, y: None)
    assert decision.choose_threshold(scores, noisy).chosen == "change-point"
    monkeypatch.setattr(decision, "change_point_threshold", lambda m, y: None)
    chosen = decision.choose_threshold(scores, noisy)
    assert chosen.chosen == "argmax" and (chosen.offsets == 0).all()
    with pytest.raises(ValueError, match="argument 'scores' must have shape"):
        decision.choose_threshold(np.zeros((4, 3)), np.zeros(4, dtype=int))


def test_auto_on_two_classes_folds_the_threshold_into_the_model():
    data = load_dataset("digits-binary")
    splits = make_splits(data, noise_transition("binary3", 2, 0.5), 0)
    config = TrainConfig(hidden=16, ce_epochs=3, dmi_epochs=3, dmi_rule="auto")
    result = run_method("dmi", splits, config, seed=0)
    record = result.decision
    assert record["rule"] == "threshold" and record["chosen"] in ("change-point", "mixture")
    assert record["offsets"] == [0.0, pytest.approx(-record["threshold"], abs=1e-4)]
    logits = result.model(splits.test.x).detach()
    expected = 100.0 * float((logits.argmax(1) == splits.test.y).double().mean())
    assert result.test_accuracy == pytest.approx(expected)
