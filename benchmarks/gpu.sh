#!/usr/bin/env bash
# GPU readiness in one table (benchmarks/gpu.py): run it whenever a CUDA GPU is at hand; it stops at 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 480 python benchmarks/gpu.py "$@"
