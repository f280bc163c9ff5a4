"""Training: the side network with fine-grained prompts, fed only from fpt.store.

Public API: ``train(cfg)``, ``evaluate_checkpoint(...)``, ``SideNetwork``, ``FusionModule``, ``ModelSpec``,
``parameter_counts``, ``classification_metrics``.
"""
from fpt.train.loop import evaluate_checkpoint, train
from fpt.train.metrics import classification_metrics
from fpt.train.model import FusionModule, ModelSpec, SideNetwork, parameter_counts

__all__ = ["evaluate_checkpoint", "train", "classification_metrics", "FusionModule", "ModelSpec", "SideNetwork",
           "parameter_counts"]
