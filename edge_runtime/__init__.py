"""Device side of edgeblock: trains one part of a model under a measured memory budget.

Imports nothing heavy at package import time, and never imports torch: a board has
numpy, onnx, onnxruntime-training, psutil, paho-mqtt and safetensors only.
"""

__version__ = "0.1.0"
