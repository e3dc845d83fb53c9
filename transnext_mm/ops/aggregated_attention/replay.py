# Copyright (c) transnext-mm contributors. All rights reserved.
"""The CPU replay of the aggregated-attention CUDA kernels (for tests; slow).

The replay (``ops/csrc/replay``) runs the CUDA kernels' block bodies, launch plans and host glue
on CPU tensors, every block's threads as fibers between real barriers, so that the tests check
the CUDA code on machines without a GPU. It is not used for real work.
"""
import torch
from torch import Tensor

from ..dispatch import choose, compiled_ext


def replay_ext():
    """The compiled module with the replay's bindings: ``aggregated_attention_forward_replay``,
    ``aggregated_attention_backward_replay``, ``aggregated_attention_launch_plans``,
    ``cuda_replay_selftest`` and ``pool_grad_target_blocks``.

    Raises:
        RuntimeError: If the replay is not built, saying how to build it.
    """
    ext = compiled_ext()
    if ext is None:
        raise RuntimeError(choose('attention', 'op', torch.device('cpu'), torch.float32).reason)
    return ext


def aggregated_attention_cuda_replay(q: Tensor, k: Tensor, v: Tensor, k_pool: Tensor,
                                     v_pool: Tensor, rpb_local: Tensor, bias_pool: Tensor,
                                     token_weight: Tensor, height: int, width: int,
                                     grad_out: Tensor = None, pool_target_blocks: int = None):
    """Run the CUDA kernels' code on CPU tensors (for tests; slow): the same block bodies,
    grids and host glue, every block's threads as fibers between real barriers.

    Args:
        grad_out (Tensor, optional): Also run the backward kernels with this output gradient.
            Defaults to None.
        pool_target_blocks (int, optional): Blocks the pooled-key gradient kernel aims for; 1
            gives one query chunk and one batch group. Defaults to None (the GPU's setting).

    Returns:
        tuple: ``(out, lse)``, and with ``grad_out`` also the 8 input gradients.
    """
    ext = replay_ext()
    args = (q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight)
    out, lse = ext.aggregated_attention_forward_replay(*args, height, width)
    if grad_out is None:
        return out, lse
    if pool_target_blocks is None:
        pool_target_blocks = ext.pool_grad_target_blocks
    grads = ext.aggregated_attention_backward_replay(grad_out, *args, out, lse, height, width,
                                                     True, pool_target_blocks)
    return out, lse, tuple(grads)
