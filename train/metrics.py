"""Classification metrics (scikit-learn) from predicted probabilities."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, cohen_kappa_score, precision_recall_fscore_support, roc_auc_score


METRIC_NAMES = ("auc", "acc", "f1", "kappa", "precision", "recall")   # what ``classification_metrics`` returns


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
    """labels [N] int, probs [N, C]. AUC: binary on the positive class, macro one-vs-rest for C > 2.
    F1/precision/recall: binary for C = 2, macro otherwise. Kappa: quadratic-weighted Cohen's kappa (as the
    paper; equal to plain kappa for two classes). A metric undefined on this data is None."""
    n_classes = probs.shape[1]
    preds = probs.argmax(axis=1)
    average = "binary" if n_classes == 2 else "macro"
    present = np.unique(labels)
    auc = None
    if len(present) == n_classes:
        auc = roc_auc_score(labels, probs[:, 1]) if n_classes == 2 else roc_auc_score(
            labels, probs, multi_class="ovr", average="macro", labels=list(range(n_classes)))
    kappa = (cohen_kappa_score(labels, preds, labels=list(range(n_classes)), weights="quadratic")
             if len(present) > 1 or len(np.unique(preds)) > 1 else None)
    # one call for the three (f1_score, precision_score and recall_score each make it): every epoch's validation
    # of every run computes these, and a sweep's runs in threads share one interpreter
    precision, recall, f1, _ = precision_recall_fscore_support(labels, preds, average=average, zero_division=0)
    out = {"auc": auc, "acc": accuracy_score(labels, preds), "f1": f1, "kappa": kappa, "precision": precision,
           "recall": recall}
    return {k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)) for k, v in out.items()}


def ppe(score: float, learnable_percent: float) -> float:
    """Performance-parameter-efficiency (paper eq. 9): score · exp(-log10(r + 1)), r = learnable / total
    parameters as a fraction (``learnable_percent`` / 100)."""
    return score * math.exp(-math.log10(learnable_percent / 100.0 + 1.0))


def pme(score: float, memory_mb: float, ft_memory_mb: float) -> float:
    """Performance-memory-efficiency (paper eq. 10): score · exp(-log10(m + 1)), m = the method's training memory
    over the memory of fully fine-tuning the LPM (both measured the same way, on the same kind of device)."""
    if ft_memory_mb <= 0:
        raise ValueError("the full fine-tuning memory must be positive")
    return score * math.exp(-math.log10(memory_mb / ft_memory_mb + 1.0))


def efficiency(score: float | None, score_name: str, learnable_percent: float, memory_mb: float | None,
               ft_memory_mb: float | None) -> dict[str, Any]:
    """A result's PPE and PME (eqs. 9-10) of ``score`` (named ``score_name``): None without a score; PME also
    None without a full fine-tuning memory reference or the run's own peak memory (``memory_mb`` None: runs that
    shared a process, ``PeakMemory.shared``)."""
    return {"score": score_name, "ppe": None if score is None else ppe(score, learnable_percent),
            "pme": None if score is None or ft_memory_mb is None or memory_mb is None
            else pme(score, memory_mb, ft_memory_mb),
            "ft_memory_mb": ft_memory_mb}
