#!/usr/bin/env bash
# Install umae under PREFIX (default ~/.local): the launcher PREFIX/bin/umae; in PREFIX/lib the
# program libumae.so and the libumae_sdk.so it was built with (the launcher loads them from
# ../lib) and Rust's shared standard library (found through the launcher's $ORIGIN/../lib
# rpath, so no LD_LIBRARY_PATH); the recipes in PREFIX/share/umae/recipes. Later builds in
# target/ do not touch the installed copy.
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
put target/release/libumae.so "$prefix/lib/libumae.so"
put "$std" "$prefix/lib/$(basename "$std")"
put target/release/umae "$prefix/bin/umae"
rm -rf "$prefix/share/umae/recipes.new.$$"
cp -r recipes "$prefix/share/umae/recipes.new.$$"
rm -rf "$prefix/share/umae/recipes"
mv "$prefix/share/umae/recipes.new.$$" "$prefix/share/umae/recipes"
"$prefix/bin/umae" --version
echo "installed umae in $prefix (bin/umae, lib/libumae.so, lib/libumae_sdk.so, share/umae/recipes)"
