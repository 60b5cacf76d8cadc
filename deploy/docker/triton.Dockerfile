# Triton for seqguard: NVIDIA's 24.10 image (Triton 2.51, TensorRT 10.5) + ONNX Runtime for the
# CPU entry's Python-backend model.py (the stock image has no onnxruntime Python package).
#   docker build -f deploy/docker/triton.Dockerfile -t registry.example.com/seqguard/triton:24.10-ort1.20 .
# The TensorRT plan must be built with this image's TensorRT (docs/gpu.md).
FROM nvcr.io/nvidia/tritonserver:24.10-py3
RUN python3 -m pip install --no-cache-dir "onnxruntime==1.20.1" "numpy<2"
USER triton-server
