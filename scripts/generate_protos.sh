#!/usr/bin/env bash
# Regenerates the Python stubs from protos/*.proto into protos/ (or into $1, which the drift test uses).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-protos}
PY=${PYTHON:-.venv/bin/python}
"$PY" -m grpc_tools.protoc -I protos --python_out="$OUT" --grpc_python_out="$OUT" --pyi_out="$OUT" protos/expert.proto
# Generated code imports its sibling module by bare name; inside the package it must be relative.
sed -i 's/^import expert_pb2 as expert__pb2/from . import expert_pb2 as expert__pb2/' "$OUT/expert_pb2_grpc.py"
