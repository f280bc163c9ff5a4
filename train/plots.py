"""The pictures people look at after a run: ROC curves and the confusion matrix of an evaluation, and the val
score over a sweep's grid, written as PNG.

Figures are drawn on matplotlib's Agg canvas directly (``Figure``, not ``pyplot``): no display is needed and a
notebook's backend is left alone. The numbers behind each picture come from functions of their own
(``roc_curves``, ``confusion``), so they are tested apart from the drawing.

Drawing a run's two pictures is ~0.25 s of Python (matplotlib's layout and Agg rendering) that holds the
interpreter's lock. Runs that share one interpreter (a sweep's runs in threads on CUDA) hand it to a
``PicturePool`` instead, so that their pictures do not stall each other's training steps.
"""
from __future__ import annotations

import threading
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import auc as area_under
from sklearn.metrics import confusion_matrix, roc_curve

from fpt.train.files import atomic_write


@dataclass
class RocCurve:
    name: str              # the positive class (one-vs-rest for more than two classes)
    fpr: np.ndarray        # [T] false positive rates, increasing
    tpr: np.ndarray        # [T] true positive rates
    auc: float


def roc_curves(labels: np.ndarray, probs: np.ndarray, classes: list[str]) -> list[RocCurve]:
    """labels [N] int, probs [N, C]. Two classes: one curve, the second class positive (as the binary AUC);
    more: one-vs-rest per class. A class absent from ``labels`` (or the only one present) has no curve."""
    positives = [1] if len(classes) == 2 else range(len(classes))
    curves = []
    for c in positives:
        truth = labels == c
        if truth.all() or not truth.any():
            continue
        fpr, tpr, _ = roc_curve(truth, probs[:, c])
        curves.append(RocCurve(classes[c], fpr, tpr, float(area_under(fpr, tpr))))
    return curves


def confusion(labels: np.ndarray, probs: np.ndarray, n_classes: int) -> np.ndarray:
    """[C, C] counts: row = true class, column = predicted class (argmax of ``probs`` [N, C])."""
    return confusion_matrix(labels, probs.argmax(axis=1), labels=list(range(n_classes)))


def write_evaluation_plots(prefix: Path, labels: np.ndarray, probs: np.ndarray, classes: list[str],
                           title: str = "") -> list[Path]:
    """``<prefix>-roc.png`` and ``<prefix>-confusion.png`` (e.g. ``run/test-roc.png``); returns the paths."""
    prefix = Path(prefix)
    roc, matrix = prefix.with_name(prefix.name + "-roc.png"), prefix.with_name(prefix.name + "-confusion.png")
    _save(_roc_figure(roc_curves(labels, probs, classes), title), roc)
    _save(_confusion_figure(confusion(labels, probs, len(classes)), classes, title), matrix)
    return [roc, matrix]


class PicturePool:
    """``write_evaluation_plots`` drawn in ``processes`` helper processes for the runs of this process: a call holds
    this process's interpreter lock only to hand over the numbers and waits for the files (so a run's metrics.json
    still comes after its pictures). Several helpers, since a sweep's runs tend to finish together. They are
    forked from the fork server (``fpt.forkserver``: this process holds CUDA and threads, and a spawned process
    would import the program again), which imports matplotlib once for all of them, and start in the background.
    If they cannot start or die, the pictures are drawn in the calling thread, with one warning."""

    def __init__(self, processes: int = 1):
        from fpt.forkserver import fork_server_context, starting

        preload = [__name__, "matplotlib.figure", "matplotlib.backends.backend_agg"]
        self._pool = ProcessPoolExecutor(processes, mp_context=fork_server_context(preload))
        self._failed = threading.Event()

        def start() -> None:
            try:
                with starting():
                    for future in [self._pool.submit(int) for _ in range(processes)]:
                        future.result()
            except Exception:           # noqa: BLE001 - the first picture's own submit meets the error
                pass
        self._starter = threading.Thread(target=start, name="fpt-picture-start", daemon=True)
        self._starter.start()

    def write_evaluation_plots(self, prefix: Path, labels: np.ndarray, probs: np.ndarray, classes: list[str],
                               title: str = "") -> list[Path]:
        """As ``write_evaluation_plots``, drawn in a helper process."""
        if not self._failed.is_set():
            self._starter.join()
            try:        # the helper could not start, is gone, or is shut down (a stopping sweep)
                future = self._pool.submit(write_evaluation_plots, prefix, labels, probs, classes, title)
            except (BrokenProcessPool, EOFError, OSError, RuntimeError) as e:
                self._give_up(e)
            else:
                try:
                    return future.result()      # a drawing's own error is raised as it is
                except BrokenProcessPool as e:  # the helper died
                    self._give_up(e)
        return write_evaluation_plots(prefix, labels, probs, classes, title)

    def _give_up(self, error: BaseException) -> None:
        if not self._failed.is_set():
            self._failed.set()
            warnings.warn(f"the picture processes failed ({type(error).__name__}: {error}); pictures are drawn in "
                          "the runs' own threads", RuntimeWarning, stacklevel=3)

    def close(self) -> None:
        self._starter.join()
        self._pool.shutdown(cancel_futures=True)


def write_sweep_plot(path: Path, lrs: list[float], weight_decays: list[float], scores: dict[tuple[float, float], float],
                     best: tuple[float, float], seed_scores: list[tuple[int, float | None]], metric: str = "AUC"
                     ) -> Path:
    """The grid's val score per (lr, weight decay) as a heat map with the chosen cell outlined, beside the test
    score of the chosen configuration per seed."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    fig = Figure(figsize=(4 + 0.9 * len(lrs), 3.2 + 0.4 * len(weight_decays)), layout="constrained")
    grid_ax, seed_ax = fig.subplots(1, 2, width_ratios=[max(2, len(lrs)), 1.6])
    values = np.array([[np.nan if scores.get((lr, wd)) is None else scores[(lr, wd)] for lr in lrs]
                       for wd in weight_decays])
    image = grid_ax.imshow(values, cmap="viridis", aspect="auto")
    for (row, col), v in np.ndenumerate(values):
        grid_ax.text(col, row, "-" if np.isnan(v) else f"{v:.3f}", ha="center", va="center",
                     color="white" if np.isnan(v) or v < np.nanmean(values) else "black", fontsize=9)
    col, row = lrs.index(best[0]), weight_decays.index(best[1])
    grid_ax.add_patch(Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    grid_ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    grid_ax.set_yticks(range(len(weight_decays)), [f"{wd:g}" for wd in weight_decays])
    grid_ax.set_xlabel("learning rate")
    grid_ax.set_ylabel("weight decay")
    grid_ax.set_title(f"val {metric} (best outlined)")
    fig.colorbar(image, ax=grid_ax, shrink=0.8)
    defined = [(s, v) for s, v in seed_scores if v is not None]
    seed_ax.scatter([0] * len(defined), [v for _, v in defined], color="tab:blue")
    if defined:
        mean = float(np.mean([v for _, v in defined]))
        seed_ax.axhline(mean, color="tab:red", linewidth=1, label=f"mean {mean:.3f}")
        seed_ax.legend(loc="lower center", fontsize=8)
    seed_ax.set_xticks([])
    seed_ax.set_title(f"test {metric}, {len(seed_scores)} seeds")
    _save(fig, Path(path))
    return Path(path)


def _roc_figure(curves: list[RocCurve], title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.8, 4.4), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    for c in curves:
        ax.plot(c.fpr, c.tpr, linewidth=1.5, label=f"{c.name} (AUC {c.auc:.3f})")
    if curves:
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "undefined: a single class in the labels", ha="center", va="center")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"ROC {title}".strip())
    return fig


def _confusion_figure(matrix: np.ndarray, classes: list[str], title: str):
    from matplotlib.figure import Figure

    side = 2.8 + 0.45 * len(classes)
    fig = Figure(figsize=(side + 0.8, side), layout="constrained")
    ax = fig.subplots()
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)      # colour: share of the row
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (r, c), n in np.ndenumerate(matrix):
        ax.text(c, r, str(n), ha="center", va="center", color="white" if share[r, c] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45 if len(classes) > 3 else 0, ha="right"
                  if len(classes) > 3 else "center")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix {title}".strip())
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    return fig


def _save(fig, path: Path) -> None:
    """PNG written atomically (a killed run never leaves half a picture)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
