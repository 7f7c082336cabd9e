"""hf_align: post-hoc CLIP-style alignment of any Hub vision encoder with any Hub text encoder.

Importing the package registers `AlignerConfig` / `AlignerModel` / `AlignerProcessor` with the transformers Auto
classes, so `AutoModel.from_pretrained(<aligner>)` and `pipeline("zero-shot-image-classification", model=<aligner>)`
work without `trust_remote_code`. The rest of the public API is imported on first use (it pulls in datasets,
Accelerate, matplotlib, ...), so `import hf_align` stays light.
"""

import importlib

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .configuration import AlignerConfig
from .losses import symmetric_infonce
from .methods import METHODS, register_method
from .modeling import AlignerModel, AlignerOutput
from .processing import AlignerProcessor
from .version import __version__

AutoConfig.register(AlignerConfig.model_type, AlignerConfig)
AutoModel.register(AlignerConfig, AlignerModel)
AutoModelForZeroShotImageClassification.register(AlignerConfig, AlignerModel)
AutoProcessor.register(AlignerConfig, AlignerProcessor)

from .pipelines import register_pipelines  # noqa: E402  (needs the Auto classes registered above)

register_pipelines()

# public name -> module (inside hf_align) that defines it
_LAZY = {
    "extract_features": "features",
    "features_for": "features",
    "features_from_tensors": "features",
    "FeatureCollator": "features",
    "train": "training",
    "AlignmentArguments": "training_args",
    "evaluate_zero_shot": "evaluation",
    "evaluate_retrieval": "evaluation",
    "retrieval_metrics": "evaluation",
    "zero_shot_metrics": "evaluation",
    "mutual_knn": "representation_similarity",
    "cka": "representation_similarity",
    "unbiased_cka": "representation_similarity",
    "select_layers": "layer_selection",
    "LayerSelectionReport": "layer_selection",
    "resolve_auto_layers": "layer_selection",
    "run_data_efficiency": "experiments.data_efficiency",
    "structure_regularizer": "regularizers.structure",
    "sinkhorn": "ot",
    "relative_representation": "relative_representations",
    "evaluate_segmentation": "segmentation",
    "segment_tokens": "segmentation_inference",
    "overlay_segmentation": "segmentation_inference",
    "log_sinkhorn": "ot",
    "load_cache": "features",
    "skipped_samples": "features",
    "FeatureCacheError": "features",
    "BadSampleError": "features",
    "push_features": "feature_hub",
    "load_features": "feature_hub",
    "check_features": "feature_hub",
    "ImageTextCollator": "lora",
    "CardDataCallback": "trainer_callback",
    "AlignerTrainer": "trainer_callback",
    "generate_model_card": "modelcard",
    "record_evaluation": "modelcard",
    "record_training_dataset": "modelcard",
    "create_model_and_transforms": "open_clip_compat",
    "run_benchmark": "benchmark",
}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    if name in ("analysis", "metrics", "testing"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "METHODS",
    "__version__",
    "AlignerConfig",
    "AlignerModel",
    "AlignerOutput",
    "AlignerProcessor",
    "register_method",
    "register_pipelines",
    "symmetric_infonce",
    *_LAZY,
]
