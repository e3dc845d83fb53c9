# mmdet's COCO detection dataset section (boxes only) on the synthetic shapes dataset of
# tools/dataset_converters/make_synthetic_coco.py: the settings of synthetic_coco.py applied.
_base_ = ['mmdet::_base_/datasets/coco_detection.py', './synthetic_coco.py']

data_root = _base_.synthetic_coco_root
metainfo = _base_.synthetic_coco_metainfo
image_scale = _base_.synthetic_coco_scale
train_pipeline = _base_.synthetic_coco_train_pipeline
test_pipeline = _base_.synthetic_coco_test_pipeline
train_dataloader = _base_.synthetic_coco_train_dataloader
val_dataloader = test_dataloader = _base_.synthetic_coco_val_dataloader
val_evaluator = test_evaluator = _base_.synthetic_coco_evaluator
