"""hf_align: post-hoc CLIP-style alignment of any Hub vision encoder with any Hub text encoder.

Importing the package registers `AlignerConfig` / `AlignerModel` / `AlignerProcessor` with the transformers Auto
classes, so `AutoModel.from_pretrained(<aligner>)` and `pipeline("zero-shot-image-classification", model=<aligner>)`
work without `trust_remote_code`.
"""

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

__version__ = "0.1.0"

AutoConfig.register(AlignerConfig.model_type, AlignerConfig)
AutoModel.register(AlignerConfig, AlignerModel)
AutoModelForZeroShotImageClassification.register(AlignerConfig, AlignerModel)
AutoProcessor.register(AlignerConfig, AlignerProcessor)

__all__ = [
    "METHODS",
    "AlignerConfig",
    "AlignerModel",
    "AlignerOutput",
    "AlignerProcessor",
    "register_method",
    "symmetric_infonce",
]
