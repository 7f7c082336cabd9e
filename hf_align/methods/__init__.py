"""Aligner methods, one module per method (PEFT-style), registered by name in `METHODS`.

Adding a method = one module in this folder whose class carries `@register_method("<name>")` (from `.registry`),
plus its import below: the built-in modules are imported by name so that the import graph is static.
"""

# The built-in methods: importing a module runs its @register_method. (`as`: re-exported, not unused.)
from . import asif as asif
from . import attention_pool as attention_pool
from . import codebook as codebook
from . import csa as csa
from . import freeze_align as freeze_align
from . import linear as linear
from . import mlp as mlp
from . import relative as relative
from . import sail as sail
from . import token_relative as token_relative
from .base import AlignerMethod, MethodConfig
from .registry import METHODS, build_method_config, get_method, register_method

__all__ = ["METHODS", "AlignerMethod", "MethodConfig", "build_method_config", "get_method", "register_method"]
