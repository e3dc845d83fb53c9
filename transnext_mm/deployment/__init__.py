# Copyright (c) transnext-mm contributors. All rights reserved.
"""Deployment: export to ONNX / ``torch.export`` and run the exported files (ONNX Runtime).

Used by tools/deployment/pytorch2onnx.py, the demos and tools/benchmark.py.
"""
from .export import FORMATS, example_input, export, prepare, read_meta
from .model import TASKS, DeployError
from .runtime import TOLERANCES, OrtModel, compare, format_report, verify

__all__ = [
    'FORMATS', 'TASKS', 'TOLERANCES', 'DeployError', 'OrtModel', 'compare', 'example_input',
    'export', 'format_report', 'prepare', 'read_meta', 'verify'
]
