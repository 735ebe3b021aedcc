"""Server side of edgeblock: defines models in torch, exports them to ONNX blocks, schedules training."""
