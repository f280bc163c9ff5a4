"""Evaluation pictures: the numbers behind the ROC curves and the confusion matrix equal scikit-learn's metrics,
and every run and evaluation writes its PNGs next to its metrics."""
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from fpt.cli import app
from fpt.train.metrics import classification_metrics
from fpt.train.plots import confusion, roc_curves, write_evaluation_plots, write_sweep_plot


def random_predictions(n: int, n_classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    logits = rng.normal(size=(n, n_classes)) + 1.5 * np.eye(n_classes)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return labels, probs


def test_binary_roc_is_the_reported_auc():
    labels, probs = random_predictions(200, 2)
    (curve,) = roc_curves(labels, probs, ["benign", "malignant"])
    assert curve.name == "malignant"
    assert curve.auc == pytest.approx(classification_metrics(labels, probs)["auc"])
    assert curve.fpr[0] == 0 and curve.tpr[-1] == 1 and np.all(np.diff(curve.fpr) >= 0)


def test_multiclass_roc_is_one_vs_rest_and_skips_absent_classes():
    labels, probs = random_predictions(300, 4, seed=1)
    curves = roc_curves(labels, probs, ["a", "b", "c", "d"])
    assert [c.name for c in curves] == ["a", "b", "c", "d"]
    for i, c in enumerate(curves):
        assert c.auc == pytest.approx(roc_auc_score(labels == i, probs[:, i]))
    assert np.mean([c.auc for c in curves]) == pytest.approx(classification_metrics(labels, probs)["auc"])
    present = labels != 3
    assert [c.name for c in roc_curves(labels[present], probs[present], ["a", "b", "c", "d"])] == ["a", "b", "c"]


def test_confusion_counts_true_rows_predicted_columns():
    labels = np.array([0, 0, 1, 1, 1, 2])
    probs = np.eye(3)[[0, 1, 1, 1, 2, 0]]
    assert confusion(labels, probs, 3).tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 0]]


def test_pictures_are_written(tmp_path):
    labels, probs = random_predictions(50, 3)
    paths = write_evaluation_plots(tmp_path / "test", labels, probs, ["x", "y", "z"], title="fpt+, test")
    assert [p.name for p in paths] == ["test-roc.png", "test-confusion.png"]
    single = write_evaluation_plots(tmp_path / "one", np.zeros(5, int), probs[:5], ["x", "y", "z"])  # ROC undefined
    lrs, wds = [1e-4, 5e-4, 1e-3], [0.0, 0.05]
    scores = {(lr, wd): 0.5 + lr * 100 + wd for lr in lrs for wd in wds}
    sweep = write_sweep_plot(tmp_path / "sweep.png", lrs, wds, scores, (1e-3, 0.05), [(0, 0.9), (1, None), (2, 0.8)])
    for path in [*paths, *single, sweep]:
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 200
    assert not list(tmp_path.glob("*.tmp"))


def test_train_and_evaluate_write_metrics_and_pictures(tmp_path, micro_store):
    runner = CliRunner()
    run = tmp_path / "run"
    trained = runner.invoke(app, ["train", "--store", str(micro_store), "--out", str(run), "--side-res", "16",
                                  "--epochs", "1", "--batch-size", "4", "--device", "cpu"])
    assert trained.exit_code == 0, trained.output
    assert {p.name for p in run.glob("*.png")} == {"test-roc.png", "test-confusion.png"}
    out = tmp_path / "eval" / "val.json"
    result = runner.invoke(app, ["evaluate", "--store", str(micro_store), "--checkpoint", str(run / "best.pt"),
                                 "--split", "val", "--out", str(out)])
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert written["split"] == "val" and written["n"] == 4 and set(written["metrics"]) >= {"auc", "acc", "kappa"}
    assert f"{written['metrics']['acc']:.4f}" in result.output      # the table shows what the file holds
    assert {p.name for p in out.parent.glob("*.png")} == {"val-roc.png", "val-confusion.png"}
