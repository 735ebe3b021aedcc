"""Device side of edgeblock: trains one part of a model under a measured memory budget.

Imports nothing heavy at package import time, and never imports torch: a board has the
maintained onnxruntime, numpy, psutil, paho-mqtt and safetensors only (no onnx package, no
onnxruntime-training: the coordinator builds every graph a board runs).
"""

__version__ = "0.1.0"
