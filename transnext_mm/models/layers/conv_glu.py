# Copyright (c) transnext-mm contributors. All rights reserved.
import torch
import torch.nn as nn

from transnext_mm.ops.conv_glu import conv_glu_gate, conv_glu_gate_linear
from transnext_mm.ops.dispatch import check_impl, conv_glu_strip_rows


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

    def __init__(self, embed_dims: int, mlp_ratio: float, drop: float = 0., impl: str = 'auto'):
        super().__init__()
        check_impl(impl)
        hidden = int(2 * int(embed_dims * mlp_ratio) / 3)
        self.impl = impl
        self.fc1 = nn.Linear(embed_dims, hidden * 2)
        self.dwconv = DepthwiseConv(hidden)
        self.fc2 = nn.Linear(hidden, embed_dims)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        # Inference through the compiled gate on a large map runs in strips of image rows
        # (transnext_mm.ops.dispatch decides), so that each strip's fc1 output stays in cache.
        rows = conv_glu_strip_rows(self.impl, x, self.parameters(), height, width,
                                   self.fc1.out_features)
        if rows < height:
            return torch.cat([
                self._strip(x, y0, min(height, y0 + rows), height, width)
                for y0 in range(0, height, rows)
            ],
                             dim=1)
        return self._strip(x, 0, height, height, width)

    def _strip(self, x: torch.Tensor, y0: int, y1: int, height: int, width: int) -> torch.Tensor:
        """Output tokens of image rows [y0, y1); the gate's 3x3 conv needs fc1 of one more row
        on each side (those rows' own outputs are dropped)."""
        top, bottom = max(0, y0 - 1), min(height, y1 + 1)
        conv = self.dwconv.dwconv
        hidden = self.fc1(x[:, top * width:bottom * width])
        if (top, bottom) == (0, height) and self.drop.p == 0:
            # Gate and fc2 in one step: in eager training the gate output is recomputed in the
            # backward instead of saved (transnext_mm.ops.dispatch decides).
            return conv_glu_gate_linear(
                hidden,
                conv.weight,
                conv.bias,
                self.fc2.weight,
                self.fc2.bias,
                height,
                width,
                impl=self.impl)
        out = conv_glu_gate(hidden, conv.weight, conv.bias, bottom - top, width, impl=self.impl)
        out = out[:, (y0 - top) * width:(y1 - top) * width]
        return self.drop(self.fc2(self.drop(out)))


class DepthwiseConv(nn.Module):
    """Holds the gate's depthwise 3x3 conv under the released key ``mlp.dwconv.dwconv``."""

    def __init__(self, channels: int):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 3, 1, 1, bias=True, groups=channels)
