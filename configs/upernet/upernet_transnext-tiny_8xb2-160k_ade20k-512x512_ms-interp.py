# Multi-scale (0.5-1.75) + flip test with the pooled-path position bias tabulated by log-CPB at
# img_size=800 and bilinearly interpolated to every test size (the paper's "interpolation").
# Run: python tools/test.py THIS_CONFIG CHECKPOINT --tta
_base_ = './upernet_transnext-tiny_8xb2-160k_ade20k-512x512.py'
# 800, not 512: the multi-scale inputs are mostly much larger than the 512 training crops.
model = dict(backbone=dict(pos_bias_mode='interpolate', img_size=800))
