# 1x detection schedule (12 epochs, steps at 8 and 11, 500 iterations of linear warm-up) with
# the AdamW optimizer of TransNeXt's Mask R-CNN: lr 1e-4 at a batch of 16 (8 GPUs x 2 images),
# weight decay 0.05 except on the backbone's query embeddings, local position biases, log-CPB
# MLPs, attention temperatures and all norm layers.
_base_ = 'mmdet::_base_/schedules/schedule_1x.py'

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(_delete_=True, type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        custom_keys={
            'query_embedding': dict(decay_mult=0.),
            'relative_pos_bias_local': dict(decay_mult=0.),
            'cpb': dict(decay_mult=0.),
            'temperature': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.),
        }))
