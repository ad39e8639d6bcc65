#!/usr/bin/env bash
# Rebuild the demo bundle if needed, then benchmark the slim runtime and keep the JSON beside this script.
#   bash benchmarks/bench_runtime.sh [WORKDIR]
set -euo pipefail
work=${1:-samf-demo}
[ -f "$work/bundle/manifest.json" ] || samf demo --workdir "$work"
samf bench --bundle "$work/bundle" --data "$work/data" --out "$(dirname "$0")/results/runtime-$(nproc)cpu.json"
