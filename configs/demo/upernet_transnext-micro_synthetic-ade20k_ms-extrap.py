# The demo model's multi-scale + flip test (tools/test.py --tta) with log-CPB evaluated at every
# test size: the demo counterpart of the _ms-extrap.py configs.
_base_ = './upernet_transnext-micro_synthetic-ade20k.py'
model = dict(backbone=dict(pos_bias_mode='extrapolate'))
