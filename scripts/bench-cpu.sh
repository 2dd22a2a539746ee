#!/usr/bin/env bash
# Side-by-side CPU benchmark of one MAE training step: umae (flex, and libtorch when the binary
# was built with --features tch) against PyTorch, alternating the programs ROUNDS times on the
# two models of docs/performance.md. Prints one line per run (for PyTorch with its peak RSS).
#
#   scripts/bench-cpu.sh [PYTHON] [REFERENCE_SCRIPT]
#
# PYTHON: a Python with torch (default: .libtorch/bin/python from scripts/setup-libtorch.sh).
# REFERENCE_SCRIPT: the PyTorch step to time (default: scripts/torch_mae_step.py).
# Environment: ROUNDS (default 3), STEPS (timed steps per run, default 20), THREADS (default 2),
# UMAE (default target/release/umae), DEVICES (default "cpu", or "cpu tch").
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-.libtorch/bin/python}
reference=${2:-scripts/torch_mae_step.py}
rounds=${ROUNDS:-3}
steps=${STEPS:-20}
threads=${THREADS:-2}
umae=${UMAE:-target/release/umae}
devices=${DEVICES:-cpu}

# name | umae recipe and overrides | batch | PyTorch model flags
models=(
    "vit-t-cifar10|recipes/mae-vitt-cifar10.ron|64|--img 32 --patch 4 --chans 3 --dim 192 --depth 12 --heads 3 --ddim 128 --ddepth 2 --dheads 4"
    "fmnist-p7|recipes/mae-fmnist.ron --set encoder.params.patch=7|256|--img 28 --patch 7 --chans 1 --dim 128 --depth 4 --heads 4 --ddim 64 --ddepth 2 --dheads 4"
)
extra=()
# PyTorch's peak memory (the process's maximum RSS) from GNU time, where it is installed.
timer=""
if [ -x /usr/bin/time ]; then timer="/usr/bin/time -f peak_rss_kib=%M"; fi
if "$python" "$reference" --help 2>/dev/null | grep -q -- "--classes"; then extra=(--classes 10); fi
for round in $(seq "$rounds"); do
    for m in "${models[@]}"; do
        IFS='|' read -r name recipe batch flags <<<"$m"
        for device in $devices; do
            # shellcheck disable=SC2086
            line=$(RAYON_NUM_THREADS=$threads "$umae" bench $recipe --batch "$batch" --steps "$steps" --device "$device" | tail -1)
            echo "round $round  $name  umae-$device  $line"
        done
        # shellcheck disable=SC2086
        line=$($timer "$python" "$reference" $flags "${extra[@]}" --batch "$batch" --steps "$steps" --threads "$threads" 2>&1 | tail -2 | tr '\n' ' ')
        echo "round $round  $name  pytorch  $line"
    done
done
