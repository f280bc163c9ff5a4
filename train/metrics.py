"""Classification metrics (scikit-learn) from predicted probabilities."""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import (accuracy_score, cohen_kappa_score, f1_score, precision_score, recall_score,
                             roc_auc_score)


def classification_metrics(labels: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
    """labels [N] int, probs [N, C]. AUC: binary on the positive class, macro one-vs-rest for C > 2.
    F1/precision/recall: binary for C = 2, macro otherwise. A metric undefined on this data is None."""
    n_classes = probs.shape[1]
    preds = probs.argmax(axis=1)
    average = "binary" if n_classes == 2 else "macro"
    present = np.unique(labels)
    auc = None
    if len(present) == n_classes:
        auc = roc_auc_score(labels, probs[:, 1]) if n_classes == 2 else roc_auc_score(
            labels, probs, multi_class="ovr", average="macro", labels=list(range(n_classes)))
    kappa = cohen_kappa_score(labels, preds) if len(present) > 1 or len(np.unique(preds)) > 1 else None
    out = {
        "auc": auc,
        "acc": accuracy_score(labels, preds),
        "f1": f1_score(labels, preds, average=average, zero_division=0),
        "kappa": kappa,
        "precision": precision_score(labels, preds, average=average, zero_division=0),
        "recall": recall_score(labels, preds, average=average, zero_division=0),
    }
    return {k: (None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)) for k, v in out.items()}
