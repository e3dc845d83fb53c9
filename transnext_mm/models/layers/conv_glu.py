# Copyright (c) transnext-mm contributors. All rights reserved.
import torch
import torch.nn as nn

from transnext_mm.ops.conv_glu import GATE_IMPLS, conv_glu_gate


class ConvGLU(nn.Module):
    """Convolutional GLU: a gated linear unit whose gate sees its 3x3 neighbourhood.

    ``fc1`` maps C to two halves of ``hidden = int(2 * mlp_ratio * C / 3)`` channels; the first
    half (the gate) goes through a depthwise 3x3 conv and GELU and multiplies the second (the
    value); ``fc2`` maps back to C. The gate is :func:`transnext_mm.ops.conv_glu.conv_glu_gate`.

    Args:
        embed_dims (int): Input and output channels.
        mlp_ratio (float): Hidden-width ratio before the 2/3 GLU correction.
        drop (float): Dropout after the gate and after ``fc2``. Defaults to 0.
        impl (str): Gate implementation: 'auto' / 'op' use the compiled CPU kernel where it
            applies, 'torch' / 'reference' PyTorch. Defaults to 'auto'.
    """

    def __init__(self, embed_dims: int, mlp_ratio: float, drop: float = 0.,
                 impl: str = 'auto'):
        super().__init__()
        if impl not in GATE_IMPLS:
            raise ValueError(f'impl must be one of {GATE_IMPLS}, got {impl!r}')
        hidden = int(2 * int(embed_dims * mlp_ratio) / 3)
        self.impl = impl
        self.fc1 = nn.Linear(embed_dims, hidden * 2)
        self.dwconv = DepthwiseConv(hidden)
        self.fc2 = nn.Linear(hidden, embed_dims)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        conv = self.dwconv.dwconv
        x = conv_glu_gate(self.fc1(x), conv.weight, conv.bias, height, width, impl=self.impl)
        return self.drop(self.fc2(self.drop(x)))


class DepthwiseConv(nn.Module):
    """Holds the gate's depthwise 3x3 conv under the released key ``mlp.dwconv.dwconv``."""

    def __init__(self, channels: int):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 3, 1, 1, bias=True, groups=channels)
