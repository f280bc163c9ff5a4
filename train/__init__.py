"""Training: the side network with fine-grained prompts (and the baselines), fed only from fpt.store.

Public API: ``train(cfg) -> RunMetrics``, ``evaluate_checkpoint(...) -> Evaluation``, ``load_checkpoint``,
``resume_config`` (an unfinished run's config, for ``--resume``), ``SideInput`` (a checkpoint's input pipeline),
``TrainStep`` (the one training step), ``SideNetwork``, ``FusionModule``,
``FptFusionModule``, ``LinearProbe``, ``ModelSpec``, ``build_model``, ``parameter_counts``,
``classification_metrics``, ``ppe``, ``pme``. Sweeps: ``fpt.train.sweep``; token maps: ``fpt.train.show``.
(Images -> probabilities needs both stages and lives above them: ``fpt.predict``.)
"""
from fpt.train.data import SideInput
from fpt.train.loop import evaluate_checkpoint, load_checkpoint, resume_config, train
from fpt.train.metrics import classification_metrics, pme, ppe
from fpt.train.results import Evaluation, RunMetrics
from fpt.train.step import TrainStep
from fpt.train.model import (FptFusionModule, FusionModule, LinearProbe, ModelSpec, SideNetwork, build_model,
                             parameter_counts)

__all__ = ["SideInput", "evaluate_checkpoint", "load_checkpoint", "resume_config", "train", "Evaluation", "RunMetrics",
           "TrainStep",
           "classification_metrics", "pme", "ppe",
           "FptFusionModule", "FusionModule", "LinearProbe", "ModelSpec", "SideNetwork", "build_model",
           "parameter_counts"]
