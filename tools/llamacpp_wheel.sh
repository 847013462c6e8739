#!/usr/bin/env bash
# Build llama-cpp-python once per (version, CPU flags) and install it into the venv.
#
# Usage: tools/llamacpp_wheel.sh PYTHON VERSION CMAKE_ARGS
#
# Why not plain `pip install`: pip's wheel cache is keyed by the download, not by CMAKE_ARGS,
# so a wheel built once with other flags (a -march=native build that crashes on this CPU) is
# served again whatever flags the Makefile now asks for. Here the wheel lives in a folder
# named after the version and a hash of the flags, built with pip's cache off; a change of
# flags builds anew, the same flags reuse it in seconds (also after `make clean`).
set -euo pipefail
python=$1
version=$2
cmake_args=$3

key=$(printf '%s %s' "$version" "$cmake_args" | sha1sum | cut -c1-12)
cache=${FINETUNE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/finetune/wheels}/llama-cpp-python-$key
wheel=$(ls "$cache"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  echo "building llama-cpp-python $version ($cmake_args); about 5 minutes on 2 cores, once"
  mkdir -p "$cache"
  tmp=$(mktemp -d "$cache.partial.XXXXXX")  # beside the cache: the final mv is a rename
  trap 'rm -rf "$tmp"' EXIT
  CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$python" -m pip wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python \
    -w "$tmp" "llama-cpp-python==$version"
  printf '%s\n' "$cmake_args" >"$tmp/CMAKE_ARGS"
  # Rename into place last, so a build killed half-way is never taken for a finished one.
  mv "$tmp"/llama_cpp_python-*.whl "$tmp/CMAKE_ARGS" "$cache"/
  wheel=$(ls "$cache"/llama_cpp_python-"$version"-*.whl | head -n 1)
fi
# --force-reinstall: a venv that holds the same version built with other flags gets this one.
"$python" -m pip install -q --no-deps --force-reinstall "$wheel"
