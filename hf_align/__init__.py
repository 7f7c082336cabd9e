"""hf_align: post-hoc CLIP-style alignment of any Hub vision encoder with any Hub text encoder.

The package is laid out as the pipeline runs (CONTRIBUTING.md, "The layers"): `encoders` → `model` → `features` →
`training` → `evaluation` → `integrations`, on top of `functional` (tensor functions), `methods`, `regularizers` and
`similarity` (the aligner's components) and `utils`.

Importing the package registers `AlignerConfig` / `AlignerModel` / `AlignerProcessor` with the transformers Auto
classes, so `AutoModel.from_pretrained(<aligner>)` and `pipeline("zero-shot-image-classification", model=<aligner>)`
work without `trust_remote_code`. The rest of the public API is imported on first use (it pulls in datasets,
Accelerate, matplotlib, ...), so `import hf_align` stays light.
"""

import importlib
from typing import TYPE_CHECKING

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .methods import METHODS, register_method
from .model.configuration import AlignerConfig
from .model.modeling import AlignerModel, AlignerOutput
from .model.processing import AlignerProcessor
from .utils import deprecation
from .version import __version__

AutoConfig.register(AlignerConfig.model_type, AlignerConfig)
AutoModel.register(AlignerConfig, AlignerModel)
AutoModelForZeroShotImageClassification.register(AlignerConfig, AlignerModel)
AutoProcessor.register(AlignerConfig, AlignerProcessor)

from .integrations import pipelines as _pipelines  # noqa: E402  (needs the Auto classes registered above)

_pipelines.register_pipelines()
deprecation.install()

# public name -> module (inside hf_align) that defines it, by stage
_LAZY = {
    # features
    "extract_features": "features.extract",
    "load_cache": "features.store",
    "features_for": "features.schema",
    "FeatureCollator": "features.schema",
    "FeatureCacheError": "features.store",
    "BadSampleError": "features.encode",
    "push_features": "features.hub",
    "load_features": "features.hub",
    "check_features": "features.hub",
    # training
    "train": "training.loop",
    "AlignmentArguments": "training.arguments",
    "select_layers": "training.layer_selection",
    "AlignerTrainer": "integrations.trainer",
    "CardDataCallback": "integrations.trainer",
    # evaluation
    "evaluate_zero_shot": "evaluation.zero_shot_retrieval",
    "evaluate_retrieval": "evaluation.zero_shot_retrieval",
    "evaluate_segmentation": "evaluation.segmentation",
    "run_benchmark": "evaluation.benchmark",
    # the model card and the Hub
    "generate_model_card": "model.card",
    "record_evaluation": "model.card",
}
_SUBPACKAGES = ("functional", "testing")

if TYPE_CHECKING:  # what the lazy names are, for IDEs and type checkers
    from . import functional as functional
    from . import testing as testing
    from .evaluation.benchmark import run_benchmark as run_benchmark
    from .evaluation.segmentation import evaluate_segmentation as evaluate_segmentation
    from .evaluation.zero_shot_retrieval import evaluate_retrieval as evaluate_retrieval
    from .evaluation.zero_shot_retrieval import evaluate_zero_shot as evaluate_zero_shot
    from .features.encode import BadSampleError as BadSampleError
    from .features.extract import extract_features as extract_features
    from .features.hub import check_features as check_features
    from .features.hub import load_features as load_features
    from .features.hub import push_features as push_features
    from .features.schema import FeatureCollator as FeatureCollator
    from .features.schema import features_for as features_for
    from .features.store import FeatureCacheError as FeatureCacheError
    from .features.store import load_cache as load_cache
    from .integrations.trainer import AlignerTrainer as AlignerTrainer
    from .integrations.trainer import CardDataCallback as CardDataCallback
    from .model.card import generate_model_card as generate_model_card
    from .model.card import record_evaluation as record_evaluation
    from .training.arguments import AlignmentArguments as AlignmentArguments
    from .training.layer_selection import select_layers as select_layers
    from .training.loop import train as train


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    return deprecation.moved_attribute(__name__, name)


__all__ = [
    "METHODS",
    "__version__",
    "AlignerConfig",
    "AlignerModel",
    "AlignerOutput",
    "AlignerProcessor",
    "register_method",
    *_LAZY,
    "functional",
]
