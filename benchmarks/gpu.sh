#!/usr/bin/env bash
# The GPU tables: every speed benchmark with `--device cuda`, one markdown file each in
# benchmarks/results/gpu/. Run from anywhere: `bash benchmarks/gpu.sh` (extra arguments, e.g.
# `--quick`, go to every script). Needs a CUDA build of torch and a GPU; about 20 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

python - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("benchmarks/gpu.sh: this torch build sees no CUDA device")
PY

out=benchmarks/results/gpu
mkdir -p "$out"
for name in per_task_grads backward aggregators weighting songoku conductor; do
    echo "== benchmarks.$name" >&2
    {
        echo "# benchmarks.$name on a GPU"
        echo
        echo "\`python -m benchmarks.$name --device cuda $*\`"
        echo
        python -m "benchmarks.$name" --device cuda "$@"
    } > "$out/$name.md"
done
echo "== benchmarks.compile" >&2
python -m benchmarks.compile --device cuda --out "$out/compile.md" "$@"
echo "wrote $out/" >&2
