# Copyright (c) transnext-mm contributors. All rights reserved.
"""mmpretrain components. Imported by the classification configs' ``custom_imports`` (and not by
``import transnext_mm``), so that mmdet and mmseg users do not need mmpretrain installed."""
from .transnext_classifier import TransNeXtClassifier, convert_released_classifier

__all__ = ['TransNeXtClassifier', 'convert_released_classifier']
