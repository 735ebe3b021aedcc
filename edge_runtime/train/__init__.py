"""The training backend: graphs, sessions, the prefix activation cache, the trainer and layer
scores. Runs only inside a job child (the agent never imports onnxruntime).
"""
