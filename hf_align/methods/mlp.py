"""`mlp`: residual MLP heads, `P x + alpha * W2 dropout(GELU(W1 x))` (`docs/methods.md` §2).

The authors' code gates the non-linear branch with a parameter initialised to -inf, so it never trains and their "MLP"
is a linear map. Here `alpha` starts at `branch_init` (> 0) and is trained, so the branch contributes from step one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..regularizers.structure import StructureRegularizer
from ..utils.checks import number, positive_int
from .base import MethodConfig
from .citations import CLIP, join
from .projection import ProjectionPair
from .registry import register_method


@dataclass
class MLPConfig(MethodConfig):
    projection_dim: int = positive_int(512)
    hidden_dim: int = positive_int(1024)
    dropout: float = number(0.1, low=0, high=1, high_inclusive=False)
    branch_init: float = number(1.0)


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
