# The synthetic shapes dataset (det_synthetic_coco_detection.py) for instance segmentation:
# LoadAnnotations also reads the polygon masks and CocoMetric scores bbox and segm, as in mmdet's
# coco_instance.py. Generate the dataset with:
#   python tools/dataset_converters/make_synthetic_coco.py --out data/synthetic_coco
_base_ = './det_synthetic_coco_detection.py'

train_pipeline = [
    dict(step, with_mask=True) if step.type == 'LoadAnnotations' else step
    for step in _base_.train_pipeline
]
test_pipeline = [
    dict(step, with_mask=True) if step.type == 'LoadAnnotations' else step
    for step in _base_.test_pipeline
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = test_dataloader = dict(dataset=dict(pipeline=test_pipeline))
val_evaluator = test_evaluator = dict(metric=['bbox', 'segm'])
