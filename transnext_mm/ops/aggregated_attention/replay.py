# Copyright (c) transnext-mm contributors. All rights reserved.
"""The CPU replay of the aggregated-attention CUDA kernels (for tests; slow).

The replay (``ops/csrc/replay``, compiled into ``transnext_mm._ext_replay``) runs the CUDA
kernels' block bodies, launch plans and host glue on CPU tensors, every block's threads as fibers
between real barriers, so that the tests check the CUDA code on machines without a GPU. It is a
test tool, not used for real work and not shipped in the wheel: ``setup.py`` builds it only with
``TRANSNEXT_MM_WITH_REPLAY=1``, which the development install (``.dev_scripts/setup_env.sh``)
sets.
"""
from torch import Tensor

from .shapes import PoolBiasTable

HOW_TO_BUILD = ('TRANSNEXT_MM_WITH_REPLAY=1 pip install --no-build-isolation -e . (what '
                '.dev_scripts/setup_env.sh runs), or in place: TRANSNEXT_MM_WITH_OPS=0 '
                'TRANSNEXT_MM_WITH_REPLAY=1 python setup.py build_ext --inplace')


def replay_ext():
    """The compiled replay ``transnext_mm._ext_replay``: ``aggregated_attention_forward_replay``,
    ``aggregated_attention_backward_replay``, their ``_table_`` variants,
    ``aggregated_attention_launch_plans``,
    ``cuda_replay_selftest`` and ``pool_grad_target_blocks``.

    Raises:
        RuntimeError: If it is not built, saying how to build it.
    """
    try:
        from transnext_mm import _ext_replay
    except ImportError as e:
        raise RuntimeError(
            'the CPU replay of the CUDA kernels (transnext_mm._ext_replay, a test tool built '
            f'only when asked for) is not built ({e}); build it with {HOW_TO_BUILD}') from e
    return _ext_replay


def aggregated_attention_cuda_replay(q: Tensor,
                                     k: Tensor,
                                     v: Tensor,
                                     k_pool: Tensor,
                                     v_pool: Tensor,
                                     rpb_local: Tensor,
                                     bias_pool: Tensor,
                                     token_weight: Tensor,
                                     height: int,
                                     width: int,
                                     grad_out: Tensor = None,
                                     pool_target_blocks: int = None,
                                     query_split: int = 0):
    """Run the CUDA kernels' code on CPU tensors (for tests; slow): the same block bodies,
    grids and host glue, every block's threads as fibers between real barriers.

    Args:
        bias_pool (Tensor | PoolBiasTable): The dense (heads, H*W, Np) bias, or its table form
            (then the table's gradient is returned in its place).
        grad_out (Tensor, optional): Also run the backward kernels with this output gradient.
            Defaults to None.
        pool_target_blocks (int, optional): Blocks the pooled-key gradient kernel aims for; 1
            gives one query chunk and one batch group. Defaults to None (the GPU's setting).
        query_split (int): Threads per query of the forward kernel (1, 2 or 4; 2 and 4 only
            for the exact head-dim variants). Defaults to 0 (the launch plan's choice).

    Returns:
        tuple: ``(out, lse)``, and with ``grad_out`` also the 8 input gradients.
    """
    ext = replay_ext()
    if isinstance(bias_pool, PoolBiasTable):
        args = (q, k, v, k_pool, v_pool, rpb_local, bias_pool.table, bias_pool.index_rows,
                bias_pool.index_cols, bias_pool.row_weights, token_weight)
        forward = ext.aggregated_attention_table_forward_replay
        backward = ext.aggregated_attention_table_backward_replay
    else:
        args = (q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight)
        forward = ext.aggregated_attention_forward_replay
        backward = ext.aggregated_attention_backward_replay
    out, lse = forward(*args, height, width, query_split)
    if grad_out is None:
        return out, lse
    if pool_target_blocks is None:
        pool_target_blocks = ext.pool_grad_target_blocks
    grads = backward(grad_out, *args, out, lse, height, width, True, pool_target_blocks)
    return out, lse, tuple(grads)
