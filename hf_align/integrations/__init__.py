"""The aligner in other libraries' interfaces: transformers pipelines, `transformers.Trainer`, open_clip."""

from .open_clip import create_model_and_transforms, get_tokenizer
from .pipelines import register_pipelines
from .trainer import AlignerTrainer, CardDataCallback

__all__ = ["AlignerTrainer", "CardDataCallback", "create_model_and_transforms", "get_tokenizer", "register_pipelines"]
