"""ONNX export: dense, sparse initializers, and the `fast` block layout of shared-split, grouped-outgoing FPE."""
