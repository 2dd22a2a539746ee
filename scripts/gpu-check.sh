#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU, run umae's CUDA build from an archive made by
# scripts/gpu-package.sh and write a markdown report:
#
#   scripts/gpu-package.sh                                   # here: build + pack (no GPU needed)
#   scripts/gpu-check.sh target/gpu/umae-cuda.tar.xz OUT     # there: from the repository root
#
# In order, each step with a time cap, the whole inside BUDGET_S seconds (default 450):
#   1. umae device-check of ViT-T (CIFAR-sized) and ViT-B/16: one training step on the GPU
#      against the CPU, f32 and bf16 (the first call is also umae's own GPU probe);
#   2. a short bf16 training run (ViT-T U-MAE, 3 epochs of 4,096 synthetic 32x32 images, batch
#      128) whose loss must fall;
#   3. umae bench of ViT-B/16 MAE at 224x224 (recipes/mae-vitb.ron), bf16 then f32:
#      images/s, model FLOPs utilisation, peak GPU memory;
#   4. the same model's step in PyTorch (scripts/torch_mae_step.py) on the same GPU: eager
#      bf16 autocast, eager f32, then torch.compile bf16 if the budget still allows.
# OUT gets report.md and logs.tar.gz (every raw output); nothing else is written outside a
# temporary folder. Steps that do not fit the budget are reported as skipped.
#
# Exit status: 0 when every step that ran passed, 1 when one failed, 2 for bad arguments or a
# machine where umae finds no usable NVIDIA GPU (then nothing is written).
#
# Environment: BATCH (images per step, default 128, MAE's per-GPU batch), STEPS (timed steps,
# default 10), PEAK_TFLOPS (the GPU's dense bf16 peak for MFU, default 989: H100/H200 SXM),
# BUDGET_S, RUN_IMAGES and RUN_BATCH (the training run's), PYTHON (default python3), DEVICE (default cuda; DEVICE=cpu with a small BATCH runs
# every step on the CPU, to try the script itself on a machine without a GPU).
set -uo pipefail
cd "$(dirname "$0")/.."

usage="usage: scripts/gpu-check.sh ARCHIVE OUT   (ARCHIVE from scripts/gpu-package.sh; OUT a new or empty folder)"
if [ $# -ne 2 ]; then
    echo "$usage" >&2
    exit 2
fi
archive=$1
out=$2
if [ ! -f "$archive" ]; then
    echo "error: $archive is not a file; make it with scripts/gpu-package.sh" >&2
    echo "$usage" >&2
    exit 2
fi
if [ -e "$out" ] && { [ ! -d "$out" ] || [ -n "$(ls -A "$out")" ]; }; then
    echo "error: $out exists and is not an empty folder; name a new one" >&2
    exit 2
fi
batch=${BATCH:-128}
steps=${STEPS:-10}
peak=${PEAK_TFLOPS:-989}
budget=${BUDGET_S:-450}
python=${PYTHON:-python3}
device=${DEVICE:-cuda}
run_images=${RUN_IMAGES:-4096}
run_batch=${RUN_BATCH:-128}
start=$SECONDS

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! tar -xJf "$archive" -C "$work" 2> "$work/untar.log" || [ ! -x "$work/umae-cuda/umae" ]; then
    echo "error: $archive is not an archive from scripts/gpu-package.sh:" >&2
    cat "$work/untar.log" >&2
    exit 2
fi
umae="$work/umae-cuda/umae"
if ! version=$("$umae" --version 2>&1); then
    echo "error: the umae in $archive does not start on this machine:" >&2
    echo "$version" >&2
    exit 1
fi

# cudarc loads NVRTC (libnvrtc.so.13) at run time: find the machine's own, from the CUDA
# toolkit or from the NVIDIA wheels beside PyTorch, and put its folder on the loader's path.
nvrtc=""
if ! ldconfig -p 2> /dev/null | grep -q 'libnvrtc\.so\.13'; then
    sites=$("$python" -c 'import site; print(" ".join(site.getsitepackages()))' 2> /dev/null || true)
    for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64 \
        $(for s in $sites; do echo "$s"/nvidia/*/lib; done); do
        if [ -e "$dir/libnvrtc.so.13" ]; then
            nvrtc=$dir
            export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            break
        fi
    done
fi

logs="$work/logs"
mkdir -p "$logs"
# 1a. umae's GPU probe and the first device check in one call: without a usable GPU it exits 2
# before doing any work, and this script stops having written nothing.
timeout -k 5 120 "$umae" device-check recipes/u-mae-vitt-cifar10.ron --device "$device" --batch 8 \
    > "$logs/device-check-vitt.txt" 2>&1
vitt_status=$?
if [ $vitt_status = 2 ]; then
    echo "error: umae finds no usable NVIDIA GPU here, so there is nothing to check:" >&2
    sed 's/^/  /' "$logs/device-check-vitt.txt" >&2
    exit 2
fi

mkdir -p "$out"
report="$out/report.md"
failed=0
say() { echo "$*" | tee -a "$report"; }
fail() { say "FAILED: $*"; failed=1; }
left() { echo $((budget - (SECONDS - start))); }
# capped SECONDS CMD...: run CMD with the smaller of SECONDS and what is left of the budget;
# status 124 when it ran out of time, 125 when no time was left to start it.
capped() {
    local cap=$1 t
    shift
    t=$(left)
    [ "$t" -gt "$cap" ] && t=$cap
    [ "$t" -lt 15 ] && return 125
    timeout -k 5 "$t" "$@"
}
# Peak GPU memory while CMD runs (nvidia-smi sampled every 100 ms), into $peak_mib.
with_memory() {
    local samples="$logs/memory-$1.txt"
    shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$samples" 2> /dev/null &
    local smi=$! status
    "$@"
    status=$?
    kill $smi 2> /dev/null
    wait $smi 2> /dev/null
    peak_mib=$(sort -n "$samples" | tail -1)
    return $status
}
json_field() { sed -nE "s/.*\"$2\":\"?([^,\"}]*).*/\1/p" "$1" | tail -1; }

gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2> /dev/null | head -1)
torch_version=$("$python" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2> /dev/null || echo "not found")
: > "$report"
say "# umae on the GPU, $(date -u +%Y-%m-%dT%H:%MZ)"
say ""
say "- GPU: ${gpu:-unknown (nvidia-smi failed)}"
say "- umae: $version; $(head -1 "$work/umae-cuda/BUILD.txt")"
say "- NVRTC: ${nvrtc:-found by the loader}"
say "- PyTorch: $torch_version"
say "- device $device, batch $batch, $steps timed steps; budget ${budget}s"
say ""

# 1. The GPU computes what the CPU does.
say "## umae device-check (one training step against the CPU, f32 and bf16)"
say ""
record_check() {
    local name=$1 status=$2 file=$3
    case $status in
        0) say "- $name: $(tail -1 "$file")" ;;
        124) fail "device-check $name ran out of time" ;;
        125) say "- $name: skipped, out of time" ;;
        *) fail "device-check $name (exit $status): $(tail -3 "$file" | tr '\n' ' ')" ;;
    esac
}
record_check "ViT-T 32x32" $vitt_status "$logs/device-check-vitt.txt"
capped 120 "$umae" device-check recipes/mae-vitb.ron --device "$device" --batch 8 > "$logs/device-check-vitb.txt" 2>&1
record_check "ViT-B/16 224x224" $? "$logs/device-check-vitb.txt"
say ""

# 2. A short bf16 training run must lower the loss.
say "## Short bf16 training run (ViT-T U-MAE, $run_images synthetic 32x32 images, batch $run_batch, 3 epochs)"
say ""
capped 120 "$umae" run recipes/u-mae-vitt-cifar10.ron --device "$device" --output "$work/run" \
    --set data.format=Synthetic --set "data.synthetic_size=$run_images" --set 'data.eval_limit=Some(256)' \
    --set train.epochs=3 --set "train.batch_size=$run_batch" --set train.accum_steps=1 \
    --set train.log_every=4 --set precision=Bf16 \
    --set eval.linear=None --set eval.knn=None > "$logs/run.txt" 2>&1
status=$?
if [ $status = 0 ]; then
    cp "$work/run/metrics.jsonl" "$logs/run-metrics.jsonl"
    losses=$(grep '"kind":"step"' "$work/run/metrics.jsonl" | sed -E 's/.*"target.pixels":([0-9.eE+-]+).*/\1/')
    first=$(echo "$losses" | head -3 | awk '{ s += $1 } END { print s / NR }')
    last=$(echo "$losses" | tail -3 | awk '{ s += $1 } END { print s / NR }')
    if awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a) }'; then
        say "- loss fell: $first -> $last (mean of the first and last three logged steps)"
    else
        fail "the loss did not fall: $first -> $last"
    fi
elif [ $status = 125 ]; then
    say "- skipped, out of time"
else
    fail "umae run on $device (exit $status): $(tail -3 "$logs/run.txt" | tr '\n' ' ')"
fi
say ""

# 3 and 4. Throughput, side by side.
# Model FLOPs per image and training step (3x the forward): a ViT block of width D on T tokens
# costs 24 T D^2 + 4 T^2 D in the forward; the encoder sees 1 + 49 tokens, the decoder 1 + 196;
# every patch is embedded (then the hidden ones dropped), and the probe is negligible.
flops=$(awk 'function blk(t, d) { return 24 * t * d * d + 4 * t * t * d }
    BEGIN { pe = 2 * 196 * 768 * 768; enc = 12 * blk(50, 768); emb = 2 * 50 * 768 * 512;
            dec = 8 * blk(197, 512); pred = 2 * 197 * 512 * 768;
            printf "%.0f", 3 * (pe + enc + emb + dec + pred) }')
mfu() { awk -v i="$1" -v f="$flops" -v p="$peak" 'BEGIN { printf "%.1f%%", 100 * i * f / (p * 1e12) }'; }
say "## Training step of ViT-B/16 MAE, 224x224, batch $batch"
say ""
say "Model FLOPs per image and step: $(awk -v f="$flops" 'BEGIN { printf "%.1f G", f / 1e9 }'); MFU against ${peak} TFLOP/s (dense bf16 peak)."
say ""
say "| program | precision | images/s | ms/step | MFU | peak GPU memory (nvidia-smi) |"
say "|---|---|---|---|---|---|"
umae_bench() {
    local prec=$1 file="$logs/umae-bench-$1.json"
    with_memory "umae-$prec" capped 150 "$umae" bench recipes/mae-vitb.ron --device "$device" --batch "$batch" \
        --steps "$steps" --warmup 3 --set "precision=$prec" --json > "$file" 2> "$logs/umae-bench-$prec.log"
    case $? in
        0) local ips
           ips=$(json_field "$file" images_per_s)
           say "| umae | $prec | $(printf %.1f "$ips") | $(printf %.1f "$(json_field "$file" ms_per_step)") | $(mfu "$ips") | ${peak_mib:-?} MiB |" ;;
        125) say "| umae | $prec | skipped: out of time | | | |" ;;
        *) fail "umae bench precision=$prec: $(tail -3 "$logs/umae-bench-$prec.log" | tr '\n' ' ')" ;;
    esac
}
torch_bench() {
    local name=$1 cap=$2
    shift 2
    local file="$logs/torch-$name.txt"
    with_memory "torch-$name" capped "$cap" "$python" scripts/torch_mae_step.py --device "$device" --batch "$batch" \
        --steps "$steps" "$@" > "$file" 2>&1
    case $? in
        0) local ips
           ips=$(json_field "$file" images_per_s)
           say "| PyTorch $(json_field "$file" torch) ${name%-*} | $(json_field "$file" precision) | $ips | $(json_field "$file" ms_per_step) | $(mfu "$ips") | ${peak_mib:-?} MiB |" ;;
        124) say "| PyTorch $name | | did not finish in time | | | |" ;;
        125) say "| PyTorch $name | | skipped: out of time | | | |" ;;
        *) fail "PyTorch $name: $(tail -3 "$file" | tr '\n' ' ')" ;;
    esac
}
if "$python" -c "import torch; assert '$device' == 'cpu' or torch.cuda.is_available()" 2> /dev/null; then
    has_torch=1
else
    has_torch=0
fi
umae_bench Bf16
[ $has_torch = 1 ] && torch_bench eager-bf16 90 --precision bf16
umae_bench F32
[ $has_torch = 1 ] && torch_bench eager-f32 90 --precision f32
[ $has_torch = 1 ] && torch_bench compile-bf16 240 --precision bf16 --compile
[ $has_torch = 1 ] || say "| PyTorch | | skipped: no CUDA-enabled torch for $python | | | |"
say ""
say "Finished in $((SECONDS - start))s of a ${budget}s budget."
[ $failed = 0 ] && say "All checks that ran passed." || say "Some checks FAILED."

tar -C "$work" -czf "$out/logs.tar.gz" logs
exit $failed
