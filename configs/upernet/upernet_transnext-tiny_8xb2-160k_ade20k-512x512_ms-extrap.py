# Multi-scale (0.5-1.75) + flip test with the pooled-path position bias evaluated by log-CPB at
# every test size (the paper's "extrapolation"; img_size plays no role).
# Run: python tools/test.py THIS_CONFIG CHECKPOINT --tta
_base_ = './upernet_transnext-tiny_8xb2-160k_ade20k-512x512.py'
model = dict(backbone=dict(pos_bias_mode='extrapolate'))
