# Copyright (c) transnext-mm contributors. All rights reserved.
"""Compare the cosine-attention query / key CPU kernels of two builds in one process, interleaved.

As ``ab_attention_op.py``: the baseline build's ``transnext_mm/_ext*.so`` copied into a package
directory of its own and imported under another name beside this checkout's build. The inputs
are those of a backbone's aggregated-attention layers (stages 1-3) at one input size, laid out as
the layer passes them: q split into heads out of its linear's output, k out of the key / value
linear's, the query embedding, the length scale, the learnable tokens and their bias, and random
output gradients. Each round times every stage's forward and backward with both builds,
alternating which goes first; the report gives per stage the median over rounds of each build's
best-of-3 time, and the total over all layers of the arch.

    cp transnext_mm/_ext*.so /tmp/base/basepkg/   # the baseline build (and an empty __init__.py)
    # ... change and rebuild: python setup.py build_ext --inplace
    python .dev_scripts/ab_cosine_qk.py /tmp/base basepkg --arch tiny --size 512 --rounds 11
"""

import ab_builds
import torch
from benchmark import layer_shapes

TOKENS = 9  # TransNeXt's learnable tokens per head


def stage_inputs(heads, head_dim, tokens, seed):
    """One stage's kernel inputs ``(q, k, query_embedding, scale, learnable_tokens,
    learnable_bias)`` and output gradients ``(grad_q, grad_k, grad_token_weight)``."""
    gen = torch.Generator().manual_seed(seed)
    channels = heads * head_dim

    def split(linear_out, groups):  # (1, N, groups * C) -> (1, groups * heads, N, d)
        return linear_out.reshape(1, tokens, groups * heads, head_dim).transpose(1, 2)

    q = split(torch.randn(1, tokens, channels, generator=gen), 1)
    k = split(torch.randn(1, tokens, 2 * channels, generator=gen), 2)[:, :heads]
    params = (torch.randn(heads, 1, head_dim, generator=gen) * 0.02,
              torch.rand(heads, tokens, 1, generator=gen) * 5,
              torch.randn(heads, head_dim, TOKENS, generator=gen) * 0.02,
              torch.zeros(heads, 1, TOKENS))
    grads = (split(torch.randn(1, tokens, channels, generator=gen),
                   1), split(torch.randn(1, tokens, channels, generator=gen),
                             1), torch.randn(1, heads, tokens, TOKENS, generator=gen))
    return (q, k, *params), grads


def prepare(ext, args, grad, part):
    if part == 'backward':
        return lambda: ext.cosine_queries_keys_backward(*grad, *args[:5])
    return lambda: ext.cosine_queries_keys_forward(*args)


def main():
    args, new, old, arch = ab_builds.setup_builds(ab_builds.ab_parser(__doc__.split('\n\n')[0]))
    cases = [(count, heads, h * w, *stage_inputs(heads, head_dim, h * w, seed=h))
             for count, heads, head_dim, h, w, _, _ in layer_shapes(arch, args.size, args.size)]
    for _, _, _, qk_args, grad in cases:  # the builds compute the same, up to fp32 sum order
        for out_new, out_old in zip(
                new.cosine_queries_keys_forward(*qk_args),
                old.cosine_queries_keys_forward(*qk_args)):
            torch.testing.assert_close(out_new, out_old)
        ab_builds.assert_gradients_agree(
            new.cosine_queries_keys_backward(*grad, *qk_args[:5]),
            old.cosine_queries_keys_backward(*grad, *qk_args[:5]))
    times = ab_builds.time_rounds({
        'base': old,
        'new': new
    }, [(qk_args, grad) for _, _, _, qk_args, grad in cases], prepare, args.rounds)
    print(f'{args.arch} at {args.size}x{args.size}, batch 1, {args.threads} threads, '
          f'{args.rounds} rounds (ms: median over rounds of the best of 3)')
    ab_builds.report(times, [(count, f'{count} layers, {tokens} tokens x {heads} heads')
                             for count, heads, tokens, _, _ in cases])


if __name__ == '__main__':
    main()
