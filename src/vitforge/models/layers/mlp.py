"""Two-layer perceptron of a transformer block (timm's `fc1`/`fc2` key names)."""

from __future__ import annotations

import torch
import torch.nn as nn


class Mlp(nn.Module):
    """Linear(D, H) -> act -> dropout -> Linear(H, D_out) -> dropout."""

    def __init__(
        self,
        in_features: int,
        *,
        hidden_features: int,
        out_features: int | None = None,
        bias: bool | tuple[bool, bool] = True,
        act_layer: type[nn.Module] = nn.GELU,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        b1, b2 = bias if isinstance(bias, tuple) else (bias, bias)
        self.fc1 = nn.Linear(in_features, hidden_features, bias=b1)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=b2)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))
