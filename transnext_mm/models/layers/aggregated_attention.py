# Copyright (c) transnext-mm contributors. All rights reserved.
"""TransNeXt attention layers: aggregated attention (stages 1-3) and full attention (stage 4).

Both use length-scaled cosine attention: queries and keys are L2-normalised, a learnable query
embedding is added to the query, and the logits are scaled by ``softplus(temperature) * ln(N)``
with ``N`` the number of keys the query sees.
"""
import math
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from transnext_mm.ops.aggregated_attention import (WINDOW_AREA, PoolBiasTable, aggregated_attention,
                                                   window_tables)
from transnext_mm.ops.cosine_qk import cosine_queries_keys
from transnext_mm.ops.dispatch import attention_bias_form, select
from .adaptive_pool import adaptive_avg_pool_tokens
from .log_cpb import LogCPB

Size = Tuple[int, int]
CPB_HIDDEN = 512
# softplus(temperature) starts at 1 / 0.24, the inverse of a typical cosine-attention temperature.
INIT_TEMPERATURE = math.log(math.expm1(1 / 0.24))


def _log_length(num_keys, like: torch.Tensor):
    """``ln(num_keys)``: a Python float, or a tensor when the size is symbolic (traced)."""
    if isinstance(num_keys, int):
        return math.log(num_keys)
    return torch.full((), num_keys, dtype=like.dtype, device=like.device).log()


def _cosine_attention_params(module: nn.Module, num_heads: int, head_dim: int) -> None:
    module.temperature = nn.Parameter(torch.full((num_heads, 1, 1), INIT_TEMPERATURE))
    module.query_embedding = nn.Parameter(
        nn.init.trunc_normal_(torch.empty(num_heads, 1, head_dim), mean=0, std=0.02))
    module.cpb_fc1 = nn.Linear(2, CPB_HIDDEN, bias=True)
    module.cpb_fc2 = nn.Linear(CPB_HIDDEN, num_heads, bias=True)


class AggregatedAttention(nn.Module):
    """Aggregated attention: a 3x3 sliding window and a pooled global path in one softmax.

    Args:
        embed_dims (int): Channels C.
        num_heads (int): Attention heads; ``C // num_heads`` is the head dimension.
        pos_bias (LogCPB): Computes the pooled-path position bias.
        attn_impl (str): Implementation of the attention core, see
            :func:`transnext_mm.ops.aggregated_attention.aggregated_attention`, and of its
            inputs, see :func:`transnext_mm.ops.cosine_qk.cosine_queries_keys`.
            Defaults to 'auto'.
    """

    def __init__(self, embed_dims: int, num_heads: int, pos_bias: LogCPB, attn_impl: str = 'auto'):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dims // num_heads
        self.attn_impl = attn_impl
        self.pos_bias = pos_bias

        self.q = nn.Linear(embed_dims, embed_dims, bias=True)
        self.kv = nn.Linear(embed_dims, embed_dims * 2, bias=True)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.sr = nn.Conv2d(embed_dims, embed_dims, kernel_size=1, stride=1)
        self.norm = nn.LayerNorm(embed_dims)
        self.act = nn.GELU()
        _cosine_attention_params(self, num_heads, self.head_dim)
        self.relative_pos_bias_local = nn.Parameter(
            nn.init.trunc_normal_(torch.empty(num_heads, WINDOW_AREA), mean=0, std=0.0004))
        self.learnable_tokens = nn.Parameter(
            nn.init.trunc_normal_(torch.empty(num_heads, self.head_dim, WINDOW_AREA), std=0.02))
        self.learnable_bias = nn.Parameter(torch.zeros(num_heads, 1, WINDOW_AREA))

    def _heads(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        B, N, _ = x.shape  # (B, N, groups*heads*d) -> (B, groups*heads, N, d)
        return x.reshape(B, N, groups * self.num_heads, self.head_dim).transpose(1, 2)

    def core_inputs(self,
                    x: torch.Tensor,
                    height: int,
                    width: int,
                    pool_size: Size,
                    bias_form: str = 'dense') -> tuple:
        """The arguments of the attention core (see ``transnext_mm.ops.aggregated_attention``):
        ``(q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight, height, width)``.

        ``bias_form='table'`` gives ``bias_pool`` as a :class:`PoolBiasTable` (see
        :meth:`LogCPB.table_form`); 'dense' (the default) materialises it.
        """
        B, N, C = x.shape
        q = self._heads(self.q(x), 1)
        k, v = self._heads(self.kv(x), 2).chunk(2, dim=1)

        # The 1x1 conv ``sr`` as a matmul on the tokens (same weights; avoids a slow conv path).
        pooled = self.act(F.linear(x, self.sr.weight.flatten(1), self.sr.bias))
        pooled = adaptive_avg_pool_tokens(pooled, height, width, pool_size)
        k_pool, v_pool = self._heads(self.kv(self.norm(pooled)), 2).chunk(2, dim=1)
        num_pool = k_pool.shape[2]

        # Length scale per query: in-image window positions + pooled keys.
        _, local_count = window_tables(height, width, x.device)
        length = torch.log((local_count + num_pool).to(x.dtype)).unsqueeze(-1)  # (N, 1)
        q, k, token_weight = cosine_queries_keys(
            q,
            k,
            self.query_embedding,
            F.softplus(self.temperature) * length,
            self.learnable_tokens,
            self.learnable_bias,
            impl=self.attn_impl)

        bias_pool = self.pos_bias(self.cpb_fc1, self.cpb_fc2, (height, width), pool_size,
                                  self.training, bias_form)
        if isinstance(bias_pool, PoolBiasTable):
            bias_pool = bias_pool._replace(table=bias_pool.table.to(x.dtype))
        else:
            bias_pool = bias_pool.to(x.dtype)
        return (q, k, v, F.normalize(k_pool, dim=-1), v_pool, self.relative_pos_bias_local,
                bias_pool, token_weight, height, width)

    def project(self, out: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, d) attention output -> (B, N, C) through ``proj``."""
        B, _, N, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(B, N, -1))

    def forward(self, x: torch.Tensor, height: int, width: int, pool_size: Size) -> torch.Tensor:
        # The table form where the compiled kernels take it (decided in ops.dispatch).
        args = self.core_inputs(x, height, width, pool_size, attention_bias_form(self.attn_impl, x))
        return self.project(aggregated_attention(*args, impl=self.attn_impl))


class FullAttention(nn.Module):
    """Full length-scaled cosine attention with log-CPB bias, used in the last stage.

    Args:
        embed_dims (int): Channels C.
        num_heads (int): Attention heads.
        pos_bias (LogCPB): Computes the position bias over all token pairs.
        attn_impl (str): 'reference' computes the scores explicitly; any other value uses
            ``F.scaled_dot_product_attention`` (:func:`transnext_mm.ops.dispatch.choose`, kernel
            ``'full_attention'``). Defaults to 'auto'.
    """

    def __init__(self, embed_dims: int, num_heads: int, pos_bias: LogCPB, attn_impl: str = 'auto'):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = embed_dims // num_heads
        self.attn_impl = attn_impl
        self.pos_bias = pos_bias
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=True)
        self.proj = nn.Linear(embed_dims, embed_dims)
        _cosine_attention_params(self, num_heads, self.head_dim)

    def attention_inputs(self, x: torch.Tensor, height: int, width: int) -> tuple:
        """``(q, k, v, bias)``: scaled queries, normalised keys, values and log-CPB bias."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3 * self.num_heads, self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=1)
        scale = F.softplus(self.temperature) * _log_length(N, x)
        q = (F.normalize(q, dim=-1) + self.query_embedding) * scale
        bias = self.pos_bias(self.cpb_fc1, self.cpb_fc2, (height, width), (height, width),
                             self.training).to(x.dtype)
        return q, F.normalize(k, dim=-1), v, bias

    def forward(self, x: torch.Tensor, height: int, width: int, pool_size: Size = None):
        B, N, C = x.shape
        q, k, v, bias = self.attention_inputs(x, height, width)
        if select('full_attention', self.attn_impl, q) == 'reference':
            out = ((q @ k.transpose(-2, -1)) + bias).softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0), scale=1.0)
        out = out.transpose(1, 2)
        if torch.compiler.is_exporting():
            # The CPU kernel's output is (B, N, heads, d) in memory, so the reshape below is
            # recorded as a view; the exporters' decomposition of attention returns (B, heads,
            # N, d), which that view cannot take.
            out = out.clone(memory_format=torch.contiguous_format)
        return self.proj(out.reshape(B, N, C))
