#!/usr/bin/env bash
# The input pipeline side by side with Pillow, alternating, on the same JPEGs:
#   PYTHON=/tmp/pil/bin/python ROUNDS=3 scripts/bench-pipeline.sh /tmp/jpegs
# PYTHON needs Pillow and numpy (python3 -m venv /tmp/pil && /tmp/pil/bin/pip install pillow
# numpy). The first Pillow run writes the 300 images into the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:?usage: scripts/bench-pipeline.sh FOLDER}
PYTHON=${PYTHON:-python3}
UMAE=${UMAE:-target/release/umae}
ROUNDS=${ROUNDS:-3}
WORKERS=${WORKERS:-$(nproc)}
for r in $(seq "$ROUNDS"); do
    echo "round $r"
    "$PYTHON" scripts/pillow-pipeline.py "$dir" | tail -n 2
    "$UMAE" bench recipes/mae-vitb.ron --data --set "data.root=\"$dir\"" --set data.format=Images --set eval.online_probe=false \
        --batch 64 --steps 10 --workers "$WORKERS"
done
