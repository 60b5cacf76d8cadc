#!/usr/bin/env bash
# Regenerate the Python gRPC code for proto/seqguard/v1/risk.proto into gateway/proto/.
#
# Usage: proto/generate.sh [OUT_DIR]        (default OUT_DIR: gateway/proto)
#   PYTHON=/path/to/python overrides the interpreter (default: .venv/bin/python, else python3);
#   it needs grpcio-tools 1.62.x (pyproject's dev extra), whose protoc matches protobuf 4.25.
#
# protoc writes risk_pb2_grpc.py with `from seqguard.v1 import risk_pb2`, the package path of
# the .proto file; it is rewritten to `from . import risk_pb2` so that the code imports as
# `from seqguard.gateway.proto import risk_pb2, risk_pb2_grpc`. The descriptor keeps the name
# seqguard/v1/risk.proto (what gRPC server reflection reports).
# tests/test_proto.py runs this script into a temporary directory and compares the output
# with the committed files.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/gateway/proto}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY="python3"; fi
fi
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

(cd "$ROOT/proto" && "$PY" -m grpc_tools.protoc -I . \
  --python_out="$TMP" --pyi_out="$TMP" --grpc_python_out="$TMP" \
  seqguard/v1/risk.proto)

GEN="$TMP/seqguard/v1"
cp "$GEN/risk_pb2.py" "$GEN/risk_pb2.pyi" "$OUT/"
sed -e 's/^from seqguard\.v1 import risk_pb2 as /from . import risk_pb2 as /' \
  "$GEN/risk_pb2_grpc.py" > "$OUT/risk_pb2_grpc.py"
grep -q '^from \. import risk_pb2 as ' "$OUT/risk_pb2_grpc.py" || {
  echo "generate.sh: import line of risk_pb2_grpc.py not rewritten (protoc output changed?)" >&2
  exit 1
}
if [ ! -f "$OUT/__init__.py" ]; then
  printf '"""Generated gRPC code for seqguard.v1 (proto/seqguard/v1/risk.proto); regenerate with proto/generate.sh."""\n' > "$OUT/__init__.py"
fi
echo "generated $OUT/{risk_pb2.py,risk_pb2.pyi,risk_pb2_grpc.py}"
