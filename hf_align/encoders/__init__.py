"""The frozen encoders: loading any Hub vision or text model (a sentence-transformers folder with its pipeline
included), where the aligner taps them (`Tap`: a source, a layer, a pooling), the poolings, running them, and LoRA on
their blocks."""

from ..utils.deprecation import module_getattr
from .loading import EncoderInfo, EncoderLoadError, load_bundled_encoder, load_encoder, probe_text, probe_vision
from .taps import Tap

__all__ = [
    "EncoderInfo",
    "EncoderLoadError",
    "Tap",
    "load_bundled_encoder",
    "load_encoder",
    "probe_text",
    "probe_vision",
]

__getattr__ = module_getattr(__name__)
