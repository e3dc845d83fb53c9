# Copyright (c) transnext-mm contributors. All rights reserved.
import torch
import torch.nn as nn


class ConvGLU(nn.Module):
    """Convolutional GLU: a gated linear unit whose gate sees its 3x3 neighbourhood.

    ``fc1`` maps C to two halves of ``hidden = int(2 * mlp_ratio * C / 3)`` channels; the first
    half (the gate) goes through a depthwise 3x3 conv and GELU and multiplies the second (the
    value); ``fc2`` maps back to C.

    Args:
        embed_dims (int): Input and output channels.
        mlp_ratio (float): Hidden-width ratio before the 2/3 GLU correction.
        drop (float): Dropout after the gate and after ``fc2``. Defaults to 0.
    """

    def __init__(self, embed_dims: int, mlp_ratio: float, drop: float = 0.):
        super().__init__()
        hidden = int(2 * int(embed_dims * mlp_ratio) / 3)
        self.fc1 = nn.Linear(embed_dims, hidden * 2)
        self.dwconv = DepthwiseConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, embed_dims)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)
        x = self.act(self.dwconv(gate, height, width)) * value
        return self.drop(self.fc2(self.drop(x)))


class DepthwiseConv(nn.Module):
    """Depthwise 3x3 conv on tokens (B, N, C); keeps the released key ``mlp.dwconv.dwconv``."""

    def __init__(self, channels: int):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 3, 1, 1, bias=True, groups=channels)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        # Tokens viewed as a channels-last image: no copies in or out of the conv.
        x = x.reshape(x.shape[0], height, width, -1).permute(0, 3, 1, 2)
        return self.dwconv(x).flatten(2).transpose(1, 2)
