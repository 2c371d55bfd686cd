"""Bridges from fednested to other federated-learning and serving stacks; each submodule imports its own optional
dependency, so nothing is imported here (importing `fednested.interop` must not need Flower or ONNX)."""
