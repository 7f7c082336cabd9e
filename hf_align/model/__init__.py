"""The saved aligner: `AlignerConfig`, the aligner's parts, `AlignerModel` (a transformers `PreTrainedModel` on two
frozen encoders), `AlignerProcessor`, prompt templates and segmentation on token maps, the model card and the Hub
upload."""

from .card import generate_model_card, record_evaluation, record_training_dataset
from .configuration import AlignerConfig
from .hub import upload_aligner
from .modeling import AlignerModel, AlignerOutput
from .processing import AlignerProcessor
from .segmentation import overlay_segmentation, segment_tokens

__all__ = [
    "AlignerConfig",
    "AlignerModel",
    "AlignerOutput",
    "AlignerProcessor",
    "generate_model_card",
    "overlay_segmentation",
    "record_evaluation",
    "record_training_dataset",
    "segment_tokens",
    "upload_aligner",
]
