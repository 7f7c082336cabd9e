"""`mlp`: residual MLP heads, `P x + alpha * W2 dropout(GELU(W1 x))` (`docs/methods.md` §2).

The authors' code gates the non-linear branch with a parameter initialised to -inf, so it never trains and their "MLP"
is a linear map. Here `alpha` starts at `branch_init` (> 0) and is trained, so the branch contributes from step one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..regularizers.structure import StructureRegularizer
from .base import MethodConfig
from .citations import CLIP, join
from .projection import ProjectionPair
from .registry import register_method


@dataclass
class MLPConfig(MethodConfig):
    projection_dim: int = 512
    hidden_dim: int = 1024
    dropout: float = 0.1
    branch_init: float = 1.0

    def __post_init__(self):
        for name in ("projection_dim", "hidden_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


class ResidualMLPHead(nn.Module):
    def __init__(self, in_dim: int, config: MLPConfig):
        super().__init__()
        self.branch_init = config.branch_init
        self.linear = nn.Linear(in_dim, config.projection_dim, bias=False)
        self.fc1 = nn.Linear(in_dim, config.hidden_dim)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(config.dropout)
        self.fc2 = nn.Linear(config.hidden_dim, config.projection_dim)
        self.alpha = nn.Parameter(torch.tensor(float(config.branch_init)))

    def reset_parameters(self) -> None:
        for layer in (self.linear, self.fc1, self.fc2):
            layer.reset_parameters()
        with torch.no_grad():
            self.alpha.fill_(self.branch_init)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The non-linear branch alone, before `alpha` (exposed so tests can check that it trains)."""
        return self.fc2(self.dropout(self.act(self.fc1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.alpha * self.branch(x)


@register_method("mlp")
class MLPAligner(ProjectionPair):
    config_class = MLPConfig
    # CLIP's objective; the residual MLP head is one of STRUCTURE's baselines
    citation = join(CLIP, StructureRegularizer.citation)

    def make_head(self, in_dim: int) -> nn.Module:
        return ResidualMLPHead(in_dim, self.config)
