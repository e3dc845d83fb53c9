# Copyright (c) transnext-mm contributors. All rights reserved.
from typing import Tuple

import torch
import torch.nn as nn
from mmcv.cnn.bricks import DropPath

from .aggregated_attention import AggregatedAttention, FullAttention
from .conv_glu import ConvGLU
from .log_cpb import LogCPB

BLOCK_NORM_EPS = 1e-6


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding: strided conv then LayerNorm; returns tokens and the grid.

    Args:
        patch_size (int): Conv kernel (7 for stage 1, 3 afterwards); padding is half of it.
        stride (int): Conv stride (4 for stage 1, 2 afterwards).
        in_channels (int): Input channels.
        embed_dims (int): Output channels.
    """

    def __init__(self, patch_size: int, stride: int, in_channels: int, embed_dims: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dims, patch_size, stride, patch_size // 2)
        self.norm = nn.LayerNorm(embed_dims)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        _, _, height, width = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class TransNeXtBlock(nn.Module):
    """Pre-norm block: attention then convolutional GLU, each with a residual and DropPath.

    Args:
        embed_dims (int): Channels.
        num_heads (int): Attention heads.
        mlp_ratio (float): ConvGLU hidden ratio.
        pos_bias (LogCPB): Position bias of this block's attention.
        full_attention (bool): Full attention (last stage) instead of aggregated attention.
        drop_path (float): Stochastic depth rate. Defaults to 0.
        attn_impl (str): Attention implementation. Defaults to 'auto'.
    """

    def __init__(self,
                 embed_dims: int,
                 num_heads: int,
                 mlp_ratio: float,
                 pos_bias: LogCPB,
                 full_attention: bool,
                 drop_path: float = 0.,
                 attn_impl: str = 'auto'):
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dims, eps=BLOCK_NORM_EPS)
        attn_cls = FullAttention if full_attention else AggregatedAttention
        self.attn = attn_cls(embed_dims, num_heads, pos_bias, attn_impl=attn_impl)
        self.norm2 = nn.LayerNorm(embed_dims, eps=BLOCK_NORM_EPS)
        self.mlp = ConvGLU(embed_dims, mlp_ratio, impl=attn_impl)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, height: int, width: int,
                pool_size: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), height, width, pool_size))
        return x + self.drop_path(self.mlp(self.norm2(x), height, width))
