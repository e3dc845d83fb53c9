# The demo model's multi-scale + flip test (tools/test.py --tta) with the position bias tabulated
# at img_size=200 and interpolated to each test size: the demo counterpart of the _ms-interp.py
# configs (ADE20K: 800 for 512 crops; here 200 for 128 crops).
_base_ = './upernet_transnext-micro_synthetic-ade20k.py'
model = dict(backbone=dict(pos_bias_mode='interpolate', img_size=200))
