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
from fpt.train.plots import PicturePool, confusion, roc_curves, write_evaluation_plots, write_sweep_plot


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


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_the_picture_process_draws_the_same_pictures_in_another_process(tmp_path, monkeypatch):
    """A sweep's runs in threads hand their pictures to a PicturePool: the same pictures, drawn while this
    process draws nothing (its drawing is made to fail here, which the helper processes do not see)."""
    import fpt.train.plots as plots

    labels, probs = random_predictions(60, 3)
    inline = write_evaluation_plots(tmp_path / "inline", labels, probs, ["x", "y", "z"], title="t")
    monkeypatch.setattr(plots, "_save", lambda fig, path: (_ for _ in ()).throw(AssertionError("drawn here")))
    pictures = PicturePool(2)
    try:
        helper = pictures.write_evaluation_plots(tmp_path / "helper", labels, probs, ["x", "y", "z"], title="t")
    finally:
        pictures.close()
    assert [p.name for p in helper] == ["helper-roc.png", "helper-confusion.png"]
    for a, b in zip(inline, helper):
        assert np.array_equal(pixels(a), pixels(b))


def test_a_failed_picture_process_leaves_the_pictures_to_the_caller_with_one_warning(tmp_path):
    import os
    import signal
    import warnings

    labels, probs = random_predictions(40, 2)
    pictures = PicturePool(2)
    try:
        pictures.write_evaluation_plots(tmp_path / "first", labels, probs, ["a", "b"])
        for pid in list(pictures._pool._processes):
            os.kill(pid, signal.SIGKILL)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            paths = [*pictures.write_evaluation_plots(tmp_path / "second", labels, probs, ["a", "b"]),
                     *pictures.write_evaluation_plots(tmp_path / "third", labels, probs, ["a", "b"])]
    finally:
        pictures.close()
    assert len([w for w in caught if "picture processes failed" in str(w.message)]) == 1
    assert all(p.exists() for p in paths)


def test_a_drawing_error_in_the_picture_process_is_raised_as_it_is(tmp_path):
    import warnings

    labels, probs = random_predictions(40, 3)
    pictures = PicturePool(2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")          # not taken for a failed helper
            with pytest.raises(ValueError, match="NaN"):
                pictures.write_evaluation_plots(tmp_path / "bad", labels, np.full_like(probs, np.nan), ["a", "b", "c"])
            assert len(pictures.write_evaluation_plots(tmp_path / "good", labels, probs, ["a", "b", "c"])) == 2
    finally:
        pictures.close()


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


def test_the_roc_picture_draws_each_curve_false_positives_across_true_positives_up():
    """The picture of ``roc_curves``: each curve (after the chance diagonal) is its false positive rates on the
    x axis and its true positive rates on the y axis, as the axes are labelled."""
    from fpt.train.plots import _roc_figure

    labels, probs = random_predictions(120, 3, seed=2)
    curves = roc_curves(labels, probs, ["x", "y", "z"])
    ax = _roc_figure(curves, "test").axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("false positive rate", "true positive rate")
    lines = ax.get_lines()[1:]
    assert len(lines) == len(curves)
    for line, curve in zip(lines, curves):
        np.testing.assert_array_equal(line.get_xdata(), curve.fpr)
        np.testing.assert_array_equal(line.get_ydata(), curve.tpr)


def test_the_confusion_picture_has_true_classes_in_rows_coloured_by_their_share_of_the_row():
    """The picture of ``confusion``: the count of (true r, predicted c) written in row r, column c, and each
    cell coloured by its share of its true class (the row), as the axes and the colour bar say."""
    from fpt.train.plots import _confusion_figure

    labels, probs = random_predictions(60, 3, seed=3)
    matrix = confusion(labels, probs, 3)
    assert not np.array_equal(matrix.sum(axis=0), matrix.sum(axis=1))          # rows and columns differ
    ax = _confusion_figure(matrix, ["x", "y", "z"], "test").axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted", "true")
    written = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert written == {(r, c): str(n) for (r, c), n in np.ndenumerate(matrix)}
    np.testing.assert_allclose(np.asarray(ax.images[0].get_array()), matrix / matrix.sum(axis=1, keepdims=True))
