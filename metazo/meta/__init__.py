"""The outer loop: meta-train a perturbation policy across tasks (trainer), the lookahead objective
(objective), and the task distribution (mixture)."""

from metazo.meta.mixture import MixtureEntry, parse_mixture, task_for_step
from metazo.meta.objective import loss_at, lookahead_parameters
from metazo.meta.trainer import (
    DEFAULT_TASKS, POLICY_FILE, MetaStepResult, MetaTrainConfig, MetaTrainer, NonFiniteMetaLossError, meta_train,
)

__all__ = [
    "MixtureEntry", "parse_mixture", "task_for_step", "loss_at", "lookahead_parameters", "DEFAULT_TASKS",
    "POLICY_FILE", "MetaStepResult", "MetaTrainConfig", "MetaTrainer", "NonFiniteMetaLossError", "meta_train",
]
