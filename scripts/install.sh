#!/usr/bin/env bash
# Install umae under PREFIX (default ~/.local): PREFIX/bin/umae, beside it in PREFIX/lib the
# libumae_sdk.so it was built with and Rust's shared standard library (found through the
# binary's $ORIGIN/../lib rpath, so no LD_LIBRARY_PATH), and the recipes in
# PREFIX/share/umae/recipes. Later builds in target/ do not touch the installed copy.
#
#     scripts/install.sh /opt/umae
#     /opt/umae/bin/umae run /opt/umae/share/umae/recipes/u-mae-fmnist.ron
#
# Plugins are built in this checkout (`cargo build --release -p NAME`) and loaded from
# wherever their .so is: /opt/umae/bin/umae --plugin target/release/libNAME.so plugins
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=${1:-$HOME/.local}
features=${UMAE_FEATURES:-}

cargo build --release ${features:+--features "$features"}
sysroot=$(rustc --print sysroot)
host=$(rustc -vV | sed -n 's/^host: //p')
std=$(ls "$sysroot/lib/rustlib/$host/lib"/libstd-*.so)

mkdir -p "$prefix/bin" "$prefix/lib" "$prefix/share/umae"
# Copies written next to their place and renamed over it, so that a running umae keeps its
# files and a failed install leaves the previous one whole.
put() {
    cp "$1" "$2.new.$$"
    mv -f "$2.new.$$" "$2"
}
put target/release/libumae_sdk.so "$prefix/lib/libumae_sdk.so"
put "$std" "$prefix/lib/$(basename "$std")"
put target/release/umae "$prefix/bin/umae"
rm -rf "$prefix/share/umae/recipes.new.$$"
cp -r recipes "$prefix/share/umae/recipes.new.$$"
rm -rf "$prefix/share/umae/recipes"
mv "$prefix/share/umae/recipes.new.$$" "$prefix/share/umae/recipes"
"$prefix/bin/umae" --version
echo "installed umae in $prefix (bin/umae, lib/libumae_sdk.so, share/umae/recipes)"
