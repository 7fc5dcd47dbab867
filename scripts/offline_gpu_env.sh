#!/usr/bin/env bash
# Source on a GPU host without internet whose image already has JAX (CUDA), flax, optax, orbax, torch + triton:
# installs the wheels carried in .whl/ (tokamax, grain, ml-collections, tensorboardX, fla-core, ...) into
# /tmp/site and puts it and the repository on PYTHONPATH.
#   source scripts/offline_gpu_env.sh
# Wheels are fetched beforehand on a machine with internet, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl tokamax==0.0.17 grain ml-collections tensorboardX fla-core==0.6.0 einshape immutabledict qwix ...
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
# tokamax imports xprof for its own benchmarking helpers only; an empty module satisfies the import.
mkdir -p /tmp/site/xprof/cli/tools
touch /tmp/site/xprof/__init__.py /tmp/site/xprof/cli/__init__.py /tmp/site/xprof/cli/tools/__init__.py \
  /tmp/site/xprof/cli/tools/get_kernel_stats_tool.py
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
