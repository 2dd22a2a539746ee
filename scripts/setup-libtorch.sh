#!/usr/bin/env bash
# Install libtorch 2.9.0 (what burn-tch 0.21 / tch 0.22 are built against) for `--features tch`,
# from the PyTorch wheel on the Python package index, into a git-ignored folder of the repository:
#
#   scripts/setup-libtorch.sh            # default folder: .libtorch/ (a Python virtual environment)
#   source .libtorch/env.sh              # LIBTORCH_USE_PYTORCH=1 and this Python for the build,
#                                        # LD_LIBRARY_PATH for the binary at run time
#   CARGO_TARGET_DIR=target/tch cargo build --release --features cuda,tch
#   target/tch/release/umae device-check recipes/mae-fmnist.ron --device tch
#   target/tch/release/umae bench recipes/mae-fmnist.ron --device tch
#
# (target/tch keeps this build's burn, built with two more backends, apart from the default
# build's in target/release, so that switching between the two rebuilds neither.)
#
# The wheel is the CUDA build of PyTorch (its NVIDIA libraries come with it, several GiB): tch
# links libtorch_cuda whenever the wheel has it, so the NVIDIA libraries must be there to link,
# even for `--device tch` on the CPU. A second run finds the installation and only rewrites env.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${1:-.libtorch}
version=2.9.0
python=${PYTHON:-python3}

if [ ! -x "$dir/bin/python" ]; then
    "$python" -m venv "$dir"
fi
if ! "$dir/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$version')" 2>/dev/null; then
    "$dir/bin/pip" install --quiet --disable-pip-version-check "torch==$version" numpy
fi
abs=$(cd "$dir" && pwd)
lib=$("$dir/bin/python" -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
cat > "$dir/env.sh" <<ENV
# Written by scripts/setup-libtorch.sh: the environment for building and running umae --features tch.
export LIBTORCH_USE_PYTORCH=1
export VIRTUAL_ENV="$abs"
export PATH="$abs/bin:\$PATH"
export LD_LIBRARY_PATH="$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
ENV
echo "libtorch $version in $abs (libraries: $lib)"
echo "next: source $dir/env.sh && CARGO_TARGET_DIR=target/tch cargo build --release --features cuda,tch"
