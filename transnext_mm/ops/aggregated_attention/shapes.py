# Copyright (c) transnext-mm contributors. All rights reserved.
"""Window size, argument checks and the dtype rule shared by every implementation of the
aggregated-attention core (see :mod:`transnext_mm.ops.aggregated_attention` for the formula and
shapes)."""
import torch

WINDOW = 3
WINDOW_AREA = WINDOW * WINDOW


def check_attention_inputs(q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight, height: int,
                           width: int) -> None:
    """Raise a ValueError naming the first argument whose shape does not fit ``q``'s."""
    B, heads, N, d = q.shape
    if N != height * width:
        raise ValueError(f'q has {N} positions but height*width = {height}*{width}')
    for name, t, shape in (('k', k, q.shape), ('v', v, q.shape), ('v_pool', v_pool, k_pool.shape),
                           ('rpb_local', rpb_local, (heads, WINDOW_AREA)),
                           ('bias_pool', bias_pool, (heads, N, k_pool.shape[2])),
                           ('token_weight', token_weight, (B, heads, N, WINDOW_AREA))):
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f'{name} must have shape {tuple(shape)}, got {tuple(t.shape)}')
    if k_pool.shape[:2] != (B, heads) or k_pool.shape[3] != d:
        raise ValueError(f'k_pool must have shape ({B}, {heads}, Np, {d}), '
                         f'got {tuple(k_pool.shape)}')


def common_dtype(tensors, device_type: str) -> torch.dtype:
    """The one dtype the compiled op and the flex_attention path compute in: the autocast dtype
    inside an autocast region on ``device_type`` (as for a matmul), else the promoted dtype of
    ``tensors``."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
