#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU, compare a training step with the CPU, benchmark ViT-B/16 MAE at
# 224x224 in f32 and bf16, train briefly and check the loss falls, and run the PyTorch reference
# step with the same model side by side. Writes REPORT_DIR/gpu-report.md (and the raw outputs).
#
#   cargo build --release --features cuda            # on any machine; carry target/release
#   scripts/gpu-check.sh [REPORT_DIR]                # on the GPU machine
#
# Environment: UMAE (binary, default target/release/umae), TORCH_STEP (the PyTorch reference
# torch_mae_step.py, skipped when missing or when python3 has no torch), BATCH (default 64),
# STEPS (timed steps, default 10), PEAK_TFLOPS (the GPU's dense bf16 peak for MFU; default 989
# for an H100/H200 SXM).
set -uo pipefail

out=${1:-gpu-report}
mkdir -p "$out"
umae=${UMAE:-target/release/umae}
torch_step=${TORCH_STEP:-../shared/bench/torch_mae_step.py}
batch=${BATCH:-64}
steps=${STEPS:-10}
peak=${PEAK_TFLOPS:-989}
report="$out/gpu-report.md"
failed=0

say() { echo "$*" | tee -a "$report"; }
fail() { say "FAILED: $*"; failed=1; }

: > "$report"
say "# umae GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
say ""
if ! command -v nvidia-smi > /dev/null || ! nvidia-smi -L > "$out/gpus.txt" 2>&1; then
    say "no NVIDIA GPU or driver here (nvidia-smi failed): nothing to check."
    exit 2
fi
say "GPU: $(head -1 "$out/gpus.txt")"
say "umae: $("$umae" --version 2>&1)"
say ""

# 1. The GPU computes what the CPU does: one training step with the same weights, images and
#    masks, f32 and bf16 (`umae device-check` exits 1 when they disagree).
say "## umae device-check"
for recipe in recipes/u-mae-vitt-cifar10.ron recipes/mae-vitb.ron; do
    if "$umae" device-check "$recipe" --device cuda > "$out/device-check.txt" 2>&1; then
        say "$recipe: $(tail -1 "$out/device-check.txt")"
    else
        fail "device-check $recipe"
    fi
    say "$(sed 's/^/    /' "$out/device-check.txt")"
done
say ""

# 2. umae bench, ViT-B/16 MAE 224x224, f32 and bf16.
# Model FLOPs per image (forward; a training step is 3x): encoder on 1 + 49 visible tokens,
# decoder on 1 + 196 tokens; a block of width D on T tokens costs 24 T D^2 + 4 T^2 D.
flops=$(awk 'function blk(t, d) { return 24 * t * d * d + 4 * t * t * d }
    BEGIN { pe = 2 * 196 * 768 * 768;  # every patch is embedded, then the hidden ones dropped
            enc = 12 * blk(50, 768); emb = 2 * 50 * 768 * 512;
            dec = 8 * blk(197, 512); pred = 2 * 197 * 512 * 768;
            printf "%.0f", 3 * (pe + enc + emb + dec + pred) }')
say "## umae bench: ViT-B/16 MAE, 224x224, batch $batch, $steps steps"
say "model FLOPs per image per training step: $(awk -v f="$flops" 'BEGIN { printf "%.1f G", f / 1e9 }')"
say ""
say "| precision | images/s | ms/step | MFU (of $peak TFLOP/s) | peak GPU memory |"
say "|---|---|---|---|---|"
for prec in F32 Bf16; do
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$out/mem-$prec.txt" 2>/dev/null &
    smi=$!
    if "$umae" bench recipes/mae-vitb.ron --device cuda --batch "$batch" --steps "$steps" \
        --set "precision=$prec" --json > "$out/bench-$prec.json" 2> "$out/bench-$prec.log"; then
        kill $smi 2>/dev/null
        ips=$(sed -E 's/.*"images_per_s":([0-9.eE+-]+).*/\1/' "$out/bench-$prec.json")
        ms=$(sed -E 's/.*"ms_per_step":([0-9.eE+-]+).*/\1/' "$out/bench-$prec.json")
        mem=$(sort -n "$out/mem-$prec.txt" | tail -1)
        mfu=$(awk -v i="$ips" -v f="$flops" -v p="$peak" 'BEGIN { printf "%.1f%%", 100 * i * f / (p * 1e12) }')
        say "| $prec | $ips | $ms | $mfu | ${mem:-?} MiB |"
    else
        kill $smi 2>/dev/null
        fail "umae bench precision=$prec (see bench-$prec.log)"
    fi
done
say ""

# 3. A short training run on the GPU must lower the loss.
say "## Short training run (ViT-T, synthetic 32x32 images, 3 epochs)"
rm -rf "$out/run"
if "$umae" run recipes/u-mae-vitt-cifar10.ron --device cuda --output "$out/run" \
    --set data.format=Synthetic --set data.synthetic_size=2048 --set 'data.eval_limit=Some(256)' \
    --set train.epochs=3 --set train.log_every=4 --set precision=Bf16 \
    --set eval.linear=None --set eval.knn=None > "$out/run.log" 2>&1; then
    losses=$(grep '"kind":"step"' "$out/run/metrics.jsonl" | sed -E 's/.*"target.pixels":([0-9.eE+-]+).*/\1/')
    first=$(echo "$losses" | head -2 | awk '{ s += $1 } END { print s / NR }')
    last=$(echo "$losses" | tail -2 | awk '{ s += $1 } END { print s / NR }')
    if awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a) }'; then
        say "loss fell: $first -> $last"
    else
        fail "loss did not fall: $first -> $last"
    fi
else
    fail "umae run on cuda (see run.log)"
fi
rm -rf "$out/run"
say ""

# 4. The PyTorch reference with the same model, side by side.
say "## PyTorch reference (same model, same batch)"
if [ -f "$torch_step" ] && python3 -c 'import torch; assert torch.cuda.is_available()' 2> /dev/null; then
    vitb="--img 224 --patch 16 --dim 768 --depth 12 --heads 12 --ddim 512 --ddepth 8 --dheads 16"
    say "| precision | images/s |"
    say "|---|---|"
    for mode in f32 bf16; do
        flag=""; [ $mode = bf16 ] && flag="--bf16"
        # shellcheck disable=SC2086
        if python3 "$torch_step" $vitb --device cuda --batch "$batch" --steps "$steps" --sdpa $flag \
            > "$out/torch-$mode.txt" 2>&1; then
            say "| $mode | $(grep RESULT "$out/torch-$mode.txt" | sed -E 's/.*images_per_s=([0-9.]+).*/\1/') |"
        else
            fail "torch_mae_step.py $mode (see torch-$mode.txt)"
        fi
    done
else
    say "skipped: $torch_step or a CUDA-enabled torch is missing"
fi

say ""
[ $failed = 0 ] && say "all checks passed" || say "some checks FAILED"
exit $failed
