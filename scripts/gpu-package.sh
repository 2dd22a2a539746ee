#!/usr/bin/env bash
# Build umae with the CUDA backend and pack everything it loads at run time, except the NVIDIA
# driver and NVRTC (which the GPU machine provides), into one compressed archive that travels to
# a GPU machine with no Rust toolchain:
#
#   scripts/gpu-package.sh [ARCHIVE]        # default: target/gpu/umae-cuda.tar.xz
#   scripts/gpu-check.sh ARCHIVE OUT        # on the GPU machine (see that script)
#
# The archive holds one folder, umae-cuda/: the stripped `umae` launcher, the program
# libumae.so, libumae_sdk.so, the Rust standard library they link dynamically, and BUILD.txt
# (commit, toolchain, features). The launcher finds them beside itself (rpath $ORIGIN). Everything else gpu-check.sh needs (recipes,
# the PyTorch reference step) is in the repository.
#
# Exit status: 0 with the archive written and its size printed; 1 if the build fails, the
# packed binary does not start, or the archive exceeds LIMIT_MIB (default 64); above TARGET_MIB
# (default 40) it warns.
set -euo pipefail
cd "$(dirname "$0")/.."

archive=${1:-target/gpu/umae-cuda.tar.xz}
limit_mib=${LIMIT_MIB:-64}
target_mib=${TARGET_MIB:-40}
for tool in cargo strip xz tar ldd; do
    command -v "$tool" > /dev/null || { echo "error: $tool is needed to package umae" >&2; exit 1; }
done

cargo build --release --features cuda

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
pkg="$stage/umae-cuda"
mkdir -p "$pkg"
cp target/release/umae target/release/libumae.so target/release/libumae_sdk.so "$pkg/"

# The Rust standard library (the launcher, the program and the SDK link it dynamically, see
# .cargo/config.toml).
sysroot_lib="$(rustc --print sysroot)/lib/rustlib/$(rustc -vV | sed -n 's/^host: //p')/lib"
for lib in $(ldd "$pkg/umae" "$pkg/libumae.so" "$pkg/libumae_sdk.so" | awk '/=>/ { print $1 }' | sort -u); do
    case "$lib" in
        libstd-*.so) cp "$sysroot_lib/$lib" "$pkg/" ;;
    esac
done
strip --strip-unneeded "$pkg"/umae "$pkg"/*.so

# Whatever the packed files still load from outside their folder must be the C library's own
# (ldd of the program lists the SDK's dependencies too).
missing=$(env -u LD_LIBRARY_PATH ldd "$pkg/umae" "$pkg/libumae.so" | awk -v pkg="$pkg" '
    /not found/ { print $1; next }
    /=>/ && index($3, pkg) != 1 && $1 !~ /^(libc|libm|libgcc_s|libpthread|libdl|librt|ld-linux.*)\.so/ { print $1 " (" $3 ")" }')
if [ -n "$missing" ]; then
    echo "error: the packed binary loads libraries the archive does not hold:" >&2
    echo "$missing" >&2
    exit 1
fi
{
    echo "umae $(git describe --always --dirty 2>/dev/null || echo unknown), built $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "features: cuda (CUDA driver API $(sed -n 's/^CUDARC_CUDA_VERSION = "\(.*\)"/\1/p' .cargo/config.toml), loaded at run time with NVRTC)"
    rustc -V
    echo "built on: $(. /etc/os-release && echo "$PRETTY_NAME"), $(ldd --version | head -1)"
} > "$pkg/BUILD.txt"
"$pkg/umae" --version > /dev/null || { echo "error: the packed umae does not start" >&2; exit 1; }

mkdir -p "$(dirname "$archive")"
tar -C "$stage" -cf - umae-cuda | xz -9e -T0 > "$archive.tmp"
mv "$archive.tmp" "$archive"
bytes=$(stat -c %s "$archive")
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "packed: $(cd "$stage" && du -b umae-cuda/* | awk '{ printf "%s %.1f MiB; ", $2, $1 / 1048576 }')"
echo "archive: $archive, $mib MiB ($bytes bytes)"
if awk -v m="$mib" -v l="$limit_mib" 'BEGIN { exit !(m > l) }'; then
    echo "error: the archive is over $limit_mib MiB (LIMIT_MIB)" >&2
    exit 1
elif awk -v m="$mib" -v t="$target_mib" 'BEGIN { exit !(m > t) }'; then
    echo "warning: the archive is over the $target_mib MiB target" >&2
fi
