"""Training an aligner on a feature cache: `AlignmentArguments` and the plan they give for the data, the batches,
layer selection, the Accelerate loop with validation, early stopping and checkpoints, and experiment trackers."""

from ..utils.deprecation import module_getattr
from .arguments import AlignmentArguments, TrainingPlan, TrainingResult, plan_training
from .layer_selection import LayerSelectionReport, resolve_auto_layers, select_layers
from .loop import train

__all__ = [
    "AlignmentArguments",
    "LayerSelectionReport",
    "TrainingPlan",
    "TrainingResult",
    "plan_training",
    "resolve_auto_layers",
    "select_layers",
    "train",
]

__getattr__ = module_getattr(__name__)
