import pytest
import torch

from transnext_mm import TransNeXt
from transnext_mm.models.layers.log_cpb import set_pos_bias_cache

PARAMS_M = {'micro': 12.42, 'tiny': 27.68, 'small': 49.16, 'base': 88.95}
DIMS = {
    'micro': [48, 96, 192, 384],
    'tiny': [72, 144, 288, 576],
    'small': [72, 144, 288, 576],
    'base': [96, 192, 384, 768]
}


@pytest.mark.parametrize('arch', ['micro', 'tiny', 'small', 'base'])
def test_arch_param_counts_and_shapes(arch):
    model = TransNeXt(arch=arch, attn_impl='torch').eval()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert round(params, 2) == PARAMS_M[arch]
    with torch.no_grad():
        outs = model(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, c, 16 // s, 24 // s)
                                              for c, s in zip(DIMS[arch], (1, 2, 4, 8))]


def test_arch_dict_and_errors():
    model = TransNeXt(
        arch=dict(embed_dims=[24, 48, 96, 192], num_heads=[1, 2, 4, 8], depths=[1, 1, 1, 1]),
        out_indices=(1, 3))
    assert model.num_features == [48, 192]
    with pytest.raises(
            ValueError, match=r"arch must be one of \['base', 'micro', 'small', 'tiny'\]"):
        TransNeXt(arch='huge')
    with pytest.raises(ValueError, match='an arch dict needs keys'):
        TransNeXt(arch=dict(embed_dims=[24, 48, 96, 192]))
    with pytest.raises(ValueError, match='must have 4 values'):
        TransNeXt(arch=dict(embed_dims=[24, 48, 96], num_heads=[1, 2, 4], depths=[1, 1, 1]))
    with pytest.raises(ValueError, match='pos_bias_mode must be one of'):
        TransNeXt(arch='micro', pos_bias_mode='bilinear')
    with pytest.raises(ValueError, match='attn_impl must be one of'):
        TransNeXt(arch='micro', attn_impl='cuda')
    with pytest.raises(ValueError, match='out_indices'):
        TransNeXt(arch='micro', out_indices=(4, ))
    with pytest.raises(ValueError, match='fixed_pool_size'):
        TransNeXt(arch='micro', fixed_pool_size=0)


def test_input_errors():
    model = TransNeXt(arch='micro', attn_impl='torch')
    with pytest.raises(ValueError, match=r'in_channels=3'):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match='too small'):
        model(torch.randn(1, 3, 28, 64))
    model(torch.randn(1, 3, 29, 29))  # the smallest size with a non-empty pooled grid


def test_integer_images_are_refused_with_what_is_expected():
    model = TransNeXt(arch='micro', attn_impl='torch')
    for dtype in (torch.uint8, torch.int64, torch.bool):
        with pytest.raises(TypeError, match=rf'floating-point input .*got dtype {dtype}'):
            model(torch.zeros(1, 3, 64, 64, dtype=dtype))


@pytest.mark.parametrize('out_indices', [(0, 1, 2, 3), (3, 1)])
@pytest.mark.parametrize('size', [(64, 64), (97, 45)])
def test_empty_batch_gives_empty_maps_of_the_batch_shapes(size, out_indices):
    """A batch of 0 images gives maps of shape (0, C, h, w) with the sizes of a batch of 1."""
    model = TransNeXt(arch='micro', attn_impl='torch', out_indices=out_indices).eval()
    with torch.no_grad():
        empty = model(torch.zeros(0, 3, *size))
        one = model(torch.zeros(1, 3, *size))
    assert len(empty) == len(out_indices)
    for e, o in zip(empty, one):
        assert e.shape == (0, *o.shape[1:]) and e.dtype == o.dtype
    with pytest.raises(ValueError, match='too small'):
        model(torch.zeros(0, 3, 28, 64))


@pytest.mark.parametrize('size', [(112, 137), (65, 33)])
def test_odd_sizes_batch2_train_and_eval(size):
    model = TransNeXt(arch='micro', attn_impl='torch', drop_path_rate=0.1)
    x = torch.randn(2, 3, *size)
    outs = model(x)  # train mode: grads flow
    sum(o.mean() for o in outs).backward()
    assert model.block1[0].attn.cpb_fc1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        outs = model(x)
        single = model(x[1:])
    expected = [-(-size[0] // s) for s in (4, 8, 16, 32)]
    assert [o.shape[2] for o in outs] == expected
    for o, s in zip(outs, single):
        torch.testing.assert_close(o[1:], s, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('attn_impl,size', [('auto', (77, 53)), ('reference', (75, 51))])
def test_training_after_inference_mode(attn_impl, size):
    """The per-size index caches first filled under torch.inference_mode (a size no other test
    uses) hold normal tensors: a later training step can save them for its backward."""
    model = TransNeXt(arch='micro', attn_impl=attn_impl).eval()
    x = torch.randn(1, 3, *size)
    with torch.inference_mode():
        expected = model(x)
    model.train()
    outs = model(x)
    sum(o.mean() for o in outs).backward()
    assert model.block1[0].attn.cpb_fc1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        for o, e in zip(model(x), expected):
            torch.testing.assert_close(o, e)


def test_large_odd_size_eval():
    model = TransNeXt(arch='micro', attn_impl='torch', out_indices=(0, 3)).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 511, 511))
    assert [tuple(o.shape) for o in outs] == [(2, 48, 128, 128), (2, 384, 16, 16)]
    assert all(torch.isfinite(o).all() for o in outs)


def test_fast_path_matches_reference_path():
    model = TransNeXt(arch='micro', attn_impl='torch')
    reference = TransNeXt(arch='micro', attn_impl='reference')
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 67, 93)
    outs, ref_outs = model(x), reference(x)
    for o, r in zip(outs, ref_outs):
        torch.testing.assert_close(o, r, rtol=1e-4, atol=1e-4)
    sum(o.square().mean() for o in outs).backward()
    sum(o.square().mean() for o in ref_outs).backward()
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_bias_modes_equal_at_table_size_and_differ_elsewhere():
    interp = TransNeXt(
        arch='micro', img_size=128, pos_bias_mode='interpolate', attn_impl='torch').eval()
    extrap = TransNeXt(
        arch='micro', img_size=128, pos_bias_mode='extrapolate', attn_impl='torch').eval()
    with torch.no_grad():  # a pronounced position bias, as after training
        for name, p in interp.named_parameters():
            if 'cpb_fc2' in name:
                p.mul_(50)
    extrap.load_state_dict(interp.state_dict())
    with torch.no_grad():
        x = torch.randn(1, 3, 128, 128)
        for a, b in zip(interp(x), extrap(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        x = torch.randn(1, 3, 192, 160)
        assert not torch.allclose(interp(x)[-1], extrap(x)[-1], atol=1e-3)


def test_fixed_pool_size_linear_mode():
    model = TransNeXt(arch='micro', fixed_pool_size=2, attn_impl='torch').eval()
    assert model._pool_size(0, 64, 48) == (2, 2)
    assert model._pool_size(3, 4, 3) == (4, 3)  # stage 4 stays full attention
    reference = TransNeXt(arch='micro', attn_impl='torch').eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        outs = model(x)
        assert [o.shape for o in outs] == [o.shape for o in reference(x)]
        assert not torch.allclose(outs[0], reference(x)[0])
        model(torch.randn(1, 3, 20, 20))  # any size works with a fixed pool


def test_frozen_stages_reapplied_in_train():
    model = TransNeXt(arch='micro', frozen_stages=2)
    model.train()
    for i in (1, 2):
        for m in (getattr(model,
                          f'patch_embed{i}'), getattr(model,
                                                      f'block{i}'), getattr(model, f'norm{i}')):
            assert not m.training
            assert all(not p.requires_grad for p in m.parameters())
    assert model.block3.training and all(p.requires_grad for p in model.block3.parameters())
    assert model.patch_embed3.training
    only_embed = TransNeXt(arch='micro', frozen_stages=0).train()
    assert not any(p.requires_grad for p in only_embed.patch_embed1.parameters())
    assert all(p.requires_grad for p in only_embed.block1.parameters())


def test_drop_path_rule_is_linear_over_all_blocks():
    model = TransNeXt(arch='micro', drop_path_rate=0.3)
    rates = [
        getattr(blk.drop_path, 'drop_prob', 0.) for i in range(1, 5)
        for blk in getattr(model, f'block{i}')
    ]
    expected = torch.linspace(0, 0.3, 21).tolist()
    assert rates == pytest.approx(expected)


def test_with_cp_gradients_equal():
    model = TransNeXt(arch='micro', attn_impl='torch')
    model_cp = TransNeXt(arch='micro', attn_impl='torch', with_cp=True)
    model_cp.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 80, requires_grad=True)
    x_cp = x.detach().clone().requires_grad_()
    sum(o.square().mean() for o in model(x)).backward()
    sum(o.square().mean() for o in model_cp(x_cp)).backward()
    torch.testing.assert_close(x.grad, x_cp.grad)
    for p, p_cp in zip(model.parameters(), model_cp.parameters()):
        torch.testing.assert_close(p.grad, p_cp.grad)


def test_eval_bias_cache_is_invalidated_by_weight_change_not_by_train():
    model = TransNeXt(arch='micro', attn_impl='torch', pos_bias_mode='extrapolate').eval()
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        first = model(x)
        attn = model.block1[0].attn
        assert len(attn.pos_bias.cached_sizes()) == 1
        attn.cpb_fc2.bias.add_(1.0)  # e.g. load_state_dict: the cached bias must not be used
        changed = model(x)
        assert not torch.allclose(first[0], changed[0])
        # train() / eval() alone change nothing the bias depends on: the cache is kept.
        model.train()
        assert len(attn.pos_bias.cached_sizes()) == 1
        model.eval()
        torch.testing.assert_close(model(x)[0], changed[0], rtol=0, atol=0)
        previous = set_pos_bias_cache(False)
        try:
            torch.testing.assert_close(model(x)[0], changed[0])
        finally:
            set_pos_bias_cache(previous)
