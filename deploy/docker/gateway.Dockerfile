# seqguard gateway image (also runs the CPU-side publish step: python -m seqguard.training.export).
# Build from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t registry.example.com/seqguard/gateway:0.1.0 .
# No torch (the gateway never imports it), no Triton server: only the pinned runtime dependencies.
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY seqguard ./seqguard
COPY training ./training
COPY gateway ./gateway
COPY proto ./proto
COPY model_repository ./model_repository
# not editable: the Triton model.py travels as package data (seqguard/triton_backend/model.py)
RUN pip install -c constraints.txt . \
 && useradd --uid 10001 --user-group --no-create-home seqguard
USER 10001
EXPOSE 50051 9090 8081
CMD ["python", "-m", "seqguard.gateway.server"]
