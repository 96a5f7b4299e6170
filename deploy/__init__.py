"""Deploying a detector: export to ONNX / OpenVINO (torch), the torch-free runtime and the HTTP service."""
