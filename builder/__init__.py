"""ONNX export and TensorRT engine build (the `build` stage; see design.md)."""
