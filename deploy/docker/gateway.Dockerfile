# seqguard gateway image (also runs the CPU-side publish step: python -m training.export).
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
# editable: seqguard.triton_repo finds model_repository/seqguard_encoder/1/model.py beside the
# source tree, which the publish step copies into every version it writes
RUN pip install -c constraints.txt -e . \
 && useradd --uid 10001 --user-group --no-create-home seqguard
USER 10001
EXPOSE 50051 9090 8081
CMD ["python", "-m", "gateway.server"]
