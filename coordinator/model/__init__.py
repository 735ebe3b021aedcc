"""The only torch: model definitions as blocks with heads, the zoo, the ONNX export and the torch
reference training used by benchmarks.
"""
