#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv if needed (.dev_scripts/setup_env.sh), generate the
# synthetic COCO-format dataset, train a TransNeXt-Micro Mask R-CNN with tools/train.py, evaluate
# the saved checkpoint with tools/test.py (COCO bbox + segm mAP). Everything lands in
# work_dirs/demo_mask-rcnn/. EPOCHS (default 12) shortens or lengthens the training.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash .dev_scripts/setup_env.sh
PY=.venv/bin/python
CONFIG=configs/demo/mask-rcnn_transnext-micro_fpn_synthetic-coco.py
WORK_DIR=work_dirs/demo_mask-rcnn
EPOCHS=${EPOCHS:-12}
export PYTHONUNBUFFERED=1

if [ ! -f data/synthetic_coco/annotations/instances_val.json ]; then
  $PY tools/dataset_converters/make_synthetic_coco.py --out data/synthetic_coco
fi
$PY tools/train.py "$CONFIG" --work-dir "$WORK_DIR" \
  --cfg-options train_cfg.max_epochs="$EPOCHS" train_cfg.val_interval="$EPOCHS"
$PY tools/test.py "$CONFIG" "$WORK_DIR/epoch_${EPOCHS}.pth" --work-dir "$WORK_DIR/test"
echo "[run_demo] checkpoint: $WORK_DIR/epoch_${EPOCHS}.pth; logs: $WORK_DIR"
