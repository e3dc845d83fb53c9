# Copyright (c) transnext-mm contributors. All rights reserved.
import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint as cp
from mmengine.logging import MMLogger
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from mmengine.runner.checkpoint import CheckpointLoader

from transnext_mm.ops.aggregated_attention import ATTN_IMPLS
from transnext_mm.utils.checkpoint import (check_arch, describe_keys, split_backbone_keys,
                                           unwrap_state_dict)
from ..layers.block import OverlapPatchEmbed, TransNeXtBlock
from ..layers.log_cpb import POS_BIAS_MODES, LogCPB

NUM_STAGES = 4
STAGE_STRIDES = (4, 8, 16, 32)
POOL_STRIDE = 32  # every stage's pooled grid is the input size // 32 at the table size


@MODELS.register_module()
class TransNeXt(BaseModule):
    """TransNeXt backbone: aggregated attention, convolutional GLU and log-CPB.

    A PyTorch implementation of `TransNeXt: Robust Foveal Visual Perception for Vision
    Transformers <https://arxiv.org/abs/2311.17132>`_ (CVPR 2024) that loads the released
    ImageNet checkpoints unchanged.

    Args:
        arch (str | dict): 'micro', 'tiny', 'small' or 'base', or a dict with keys
            ``embed_dims``, ``num_heads`` and ``depths`` (4 values each) and optionally
            ``mlp_ratios`` and ``pool_ratios``. Defaults to 'tiny'.
        in_channels (int): Input image channels. Defaults to 3.
        img_size (int): Input size at which 'interpolate' mode tabulates the pooled-path
            position bias. Defaults to 224.
        pretrain_size (int): Input size of the ImageNet pretraining; sets the log-CPB coordinate
            scale. Defaults to 224.
        pos_bias_mode (str): 'interpolate' resizes the bias tabulated at ``img_size`` to the
            actual feature size; 'extrapolate' evaluates log-CPB at the actual size.
            Defaults to 'interpolate'.
        fixed_pool_size (int, optional): Fix the pooled grid of stages 1-3 to this size (the
            paper's linear-complexity inference mode) instead of ``H // pool_ratio``.
            Defaults to None.
        out_indices (Sequence[int]): Stages (0-3) whose normalised NCHW maps are returned.
            Defaults to (0, 1, 2, 3).
        frozen_stages (int): -1 freezes nothing, 0 the first patch embedding, ``k >= 1`` the
            first ``k`` stages (patch embedding, blocks and norm); re-applied in ``train()``.
            Defaults to -1.
        drop_path_rate (float): Stochastic depth rate, rising linearly over all blocks.
            Defaults to 0.
        with_cp (bool): Gradient checkpointing per block, to save training memory.
            Defaults to False.
        attn_impl (str): 'auto' (the compiled op when it has kernels for the input, else the
            PyTorch path with one warning), 'torch', 'op' or 'reference' (the readable unfold
            path used as test oracle). On the CPU 'auto' and 'op' also run the ConvGLU gate,
            the cosine-attention inputs and the log-CPB MLP with their compiled kernels
            (inference and training); 'torch' and 'reference' run them with PyTorch.
            Defaults to 'auto'.
        pretrained (str, optional): Deprecated, use ``init_cfg``. Defaults to None.
        init_cfg (dict, optional): ``dict(type='Pretrained', checkpoint=PATH)`` loads a released
            ImageNet checkpoint (plain, or under 'model'/'state_dict', with or without
            'module.'/'backbone.' prefixes). Defaults to None.
    """
    arch_settings: Dict[str, dict] = {
        'micro': dict(embed_dims=[48, 96, 192, 384], num_heads=[2, 4, 8, 16], depths=[2, 2, 15, 2]),
        'tiny':
        dict(embed_dims=[72, 144, 288, 576], num_heads=[3, 6, 12, 24], depths=[2, 2, 15, 2]),
        'small':
        dict(embed_dims=[72, 144, 288, 576], num_heads=[3, 6, 12, 24], depths=[5, 5, 22, 5]),
        'base':
        dict(embed_dims=[96, 192, 384, 768], num_heads=[4, 8, 16, 32], depths=[5, 5, 23, 5]),
    }
    default_mlp_ratios = [8, 8, 4, 4]
    default_pool_ratios = [8, 4, 2, 1]

    def __init__(self,
                 arch: Union[str, dict] = 'tiny',
                 in_channels: int = 3,
                 img_size: int = 224,
                 pretrain_size: int = 224,
                 pos_bias_mode: str = 'interpolate',
                 fixed_pool_size: Optional[int] = None,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1,
                 drop_path_rate: float = 0.,
                 with_cp: bool = False,
                 attn_impl: str = 'auto',
                 pretrained: Optional[str] = None,
                 init_cfg: Optional[dict] = None):
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError('give either pretrained= or init_cfg=, not both')
            warnings.warn('TransNeXt: `pretrained` is deprecated, use '
                          "init_cfg=dict(type='Pretrained', checkpoint=...)")
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        super().__init__(init_cfg=init_cfg)

        self.arch = self._parse_arch(arch)
        if pos_bias_mode not in POS_BIAS_MODES:
            raise ValueError(f'pos_bias_mode must be one of {POS_BIAS_MODES}, '
                             f'got {pos_bias_mode!r}')
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f'attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}')
        if fixed_pool_size is not None and (not isinstance(fixed_pool_size, int)
                                            or fixed_pool_size < 1):
            raise ValueError(f'fixed_pool_size must be None or a positive int, '
                             f'got {fixed_pool_size!r}')
        if isinstance(out_indices, int):
            out_indices = (out_indices, )
        out_indices = tuple(i + NUM_STAGES if i < 0 else i for i in out_indices)
        if not out_indices or any(i not in range(NUM_STAGES) for i in out_indices):
            raise ValueError(f'out_indices must hold stage indices in 0..3, got {out_indices}')
        if not -1 <= frozen_stages <= NUM_STAGES:
            raise ValueError(f'frozen_stages must be in -1..4, got {frozen_stages}')
        if img_size < POOL_STRIDE or pretrain_size < 2 * POOL_STRIDE:
            raise ValueError(f'img_size must be >= {POOL_STRIDE} and pretrain_size >= '
                             f'{2 * POOL_STRIDE}, got {img_size} and {pretrain_size}')

        self.in_channels = in_channels
        self.img_size = img_size
        self.pretrain_size = pretrain_size
        self.pos_bias_mode = pos_bias_mode
        self.fixed_pool_size = fixed_pool_size
        self.out_indices = out_indices
        self.frozen_stages = frozen_stages
        self.with_cp = with_cp
        self.attn_impl = attn_impl
        self.embed_dims = self.arch['embed_dims']
        self.num_features = [self.embed_dims[i] for i in out_indices]

        depths = self.arch['depths']
        # On the CPU also while a meta default device builds the model (fast initialisation).
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        for i in range(NUM_STAGES):
            stride = STAGE_STRIDES[i]
            dims = self.embed_dims[i]
            patch_embed = OverlapPatchEmbed(7 if i == 0 else 3, 4 if i == 0 else 2,
                                            in_channels if i == 0 else self.embed_dims[i - 1], dims)
            table_query = (img_size // stride, ) * 2
            table_key = table_query if i == NUM_STAGES - 1 else (img_size // POOL_STRIDE, ) * 2
            blocks = nn.ModuleList([
                TransNeXtBlock(
                    dims,
                    self.arch['num_heads'][i],
                    self.arch['mlp_ratios'][i],
                    LogCPB(pos_bias_mode, table_query, table_key, pretrain_size // stride,
                           attn_impl),
                    full_attention=i == NUM_STAGES - 1,
                    drop_path=dpr[sum(depths[:i]) + j],
                    attn_impl=attn_impl) for j in range(depths[i])
            ])
            setattr(self, f'patch_embed{i + 1}', patch_embed)
            setattr(self, f'block{i + 1}', blocks)
            setattr(self, f'norm{i + 1}', nn.LayerNorm(dims, eps=1e-6))
        self.apply(self._init_module)
        self._freeze_stages()

    def _parse_arch(self, arch: Union[str, dict]) -> dict:
        if isinstance(arch, str):
            if arch not in self.arch_settings:
                raise ValueError(f'arch must be one of {sorted(self.arch_settings)} or a dict, '
                                 f'got {arch!r}')
            arch = self.arch_settings[arch]
        elif not isinstance(arch, dict):
            raise TypeError(f'arch must be a str or a dict, got {type(arch).__name__}')
        required = {'embed_dims', 'num_heads', 'depths'}
        allowed = required | {'mlp_ratios', 'pool_ratios'}
        if not required <= set(arch) or not set(arch) <= allowed:
            raise ValueError(f'an arch dict needs keys {sorted(required)} (optional: '
                             f'mlp_ratios, pool_ratios), got {sorted(arch)}')
        arch = dict(
            mlp_ratios=self.default_mlp_ratios, pool_ratios=self.default_pool_ratios, **arch)
        for key, value in arch.items():
            if len(value) != NUM_STAGES:
                raise ValueError(f'arch[{key!r}] must have {NUM_STAGES} values, got {value}')
        for dims, heads in zip(arch['embed_dims'], arch['num_heads']):
            if dims % heads:
                raise ValueError(f'arch embed_dims {dims} not divisible by num_heads {heads}')
        return {k: list(v) for k, v in arch.items()}

    @staticmethod
    def _init_module(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ stages
    def _stage_modules(self, i: int):
        return [
            getattr(self, f'patch_embed{i}'),
            getattr(self, f'block{i}'),
            getattr(self, f'norm{i}')
        ]

    def _freeze_stages(self) -> None:
        frozen = [self.patch_embed1] if self.frozen_stages == 0 else [
            m for i in range(1, self.frozen_stages + 1) for m in self._stage_modules(i)
        ]
        for m in frozen:
            m.eval()
            for p in m.parameters():
                p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        return self

    def _pool_size(self, stage: int, height: int, width: int) -> Tuple[int, int]:
        if stage == NUM_STAGES - 1:
            return height, width
        if self.fixed_pool_size is not None:
            return self.fixed_pool_size, self.fixed_pool_size
        ratio = self.arch['pool_ratios'][stage]
        return height // ratio, width // ratio

    def _check_input(self, x: torch.Tensor) -> List[Tuple[int, int]]:
        """Check the input's shape and dtype; return the feature size of every stage."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f'TransNeXt expects input of shape (B, {self.in_channels}, H, W) '
                             f'(in_channels={self.in_channels}), got {shape}')
        if not x.is_floating_point():
            raise TypeError(
                f'TransNeXt expects a floating-point input (normalised images, as the '
                f"toolboxes' data preprocessors produce them), got dtype {x.dtype}; convert "
                'integer images with e.g. (x.float() - mean) / std')
        height, width = x.shape[2:]
        sizes = []
        for i in range(NUM_STAGES):
            # Feature size after stage i+1's patch embedding (7x7/4 then 3x3/2, half padding).
            height, width = ((height - 1) // (4 if i == 0 else 2) + 1,
                             (width - 1) // (4 if i == 0 else 2) + 1)
            sizes.append((height, width))
            if i == NUM_STAGES - 1:
                break
            pool = self._pool_size(i, height, width)
            if min(pool) < 1:
                raise ValueError(
                    f'input {tuple(x.shape[2:])} is too small for TransNeXt: stage {i + 1} has a '
                    f'{height}x{width} feature map, whose pooled grid (//'
                    f'{self.arch["pool_ratios"][i]}) is empty; use inputs of at least 29x29 '
                    'pixels (32x32 or larger recommended)')
        return sizes

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        sizes = self._check_input(x)
        if x.shape[0] == 0:
            # An empty batch gives empty maps of the right shapes, as convolutional backbones do.
            return tuple(
                x.new_empty((0, self.embed_dims[i], *sizes[i])) for i in range(NUM_STAGES)
                if i in self.out_indices)
        outs = []
        for i in range(NUM_STAGES):
            patch_embed, blocks, norm = self._stage_modules(i + 1)
            x, height, width = patch_embed(x)
            pool_size = self._pool_size(i, height, width)
            for block in blocks:
                if self.with_cp and self.training and torch.is_grad_enabled():
                    x = cp.checkpoint(block, x, height, width, pool_size, use_reentrant=False)
                else:
                    x = block(x, height, width, pool_size)
            # A channels-last view feeds the next patch embedding without a copy.
            x = norm(x).reshape(x.shape[0], height, width, -1).permute(0, 3, 1, 2)
            if i in self.out_indices:
                outs.append(x.contiguous())
        return tuple(outs)

    # ------------------------------------------------------------- checkpoints
    def init_weights(self) -> None:
        if self.init_cfg is None or self.init_cfg.get('type') != 'Pretrained':
            super().init_weights()
            return
        checkpoint = CheckpointLoader.load_checkpoint(
            self.init_cfg['checkpoint'], map_location='cpu', logger='current')
        self.load_released_weights(checkpoint, source=self.init_cfg['checkpoint'])
        self._is_init = True

    def load_released_weights(self, checkpoint, source: str = 'checkpoint') -> None:
        """Load a released TransNeXt checkpoint (any wrapping) into this backbone.

        Raises:
            ValueError: if it is not a TransNeXt checkpoint, is for another arch, or lacks
                weights of this backbone.
        """
        state_dict = unwrap_state_dict(checkpoint)
        check_arch(state_dict, self.arch, self.arch_settings, source, target='this backbone')
        weights, classifier, derived = split_backbone_keys(state_dict)
        own = self.state_dict()
        missing = [k for k in own if k not in weights]
        unexpected = [k for k in weights if k not in own]
        if missing:
            raise ValueError(f'{source} lacks {len(missing)} TransNeXt weights: '
                             f'{describe_keys(missing)}')
        wrong_shape = [
            f'{k}: {tuple(weights[k].shape)} vs {tuple(own[k].shape)}' for k in own
            if weights[k].shape != own[k].shape
        ]
        if wrong_shape:
            raise ValueError(f'{source} has weights of the wrong shape: '
                             f'{describe_keys(wrong_shape)}')
        self.load_state_dict({k: weights[k] for k in own}, strict=True)
        logger = MMLogger.get_current_instance()
        logger.info(f'TransNeXt: loaded {len(own)} tensors from {source}' +
                    (f'; dropped classifier {classifier}' if classifier else '') +
                    (f'; ignored derived buffers {describe_keys(derived)}' if derived else ''))
        if unexpected:
            logger.warning(f'TransNeXt: {source} has {len(unexpected)} unexpected keys, not '
                           f'loaded: {describe_keys(unexpected)}')
