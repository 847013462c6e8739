#!/usr/bin/env bash
# Build llama-cpp-python once per (version, CPU flags, machine) and install it into the venv.
#
# Usage: LLAMACPP_CMAKE_ARGS="..." tools/llamacpp_wheel.sh PYTHON VERSION
# (the flags travel in the environment, untouched by a second round of shell quoting)
#
# Why not plain `pip install`: pip's wheel cache is keyed by the download, not by CMAKE_ARGS,
# so a wheel built once with other flags (a -march=native build that crashes on this CPU) is
# served again whatever flags the Makefile now asks for. Here the wheel lives in a folder
# named after a hash of the version, the flags and the architecture (and, for a native
# build, this CPU's model and features), built with pip's cache off; a change of any of them
# builds anew, the same ones reuse it in seconds (also after `make clean`).
set -euo pipefail
if [ "$#" -ne 2 ]; then
  echo "usage: LLAMACPP_CMAKE_ARGS=... $0 PYTHON VERSION" >&2
  exit 2
fi
python=$1
version=$2
cmake_args=${LLAMACPP_CMAKE_ARGS:-}

machine=$(uname -m)
case " $cmake_args " in
  *" -DGGML_NATIVE=OFF "*) ;;
  # A native build is this CPU's alone: another CPU sharing the cache builds its own.
  *) machine="$machine $(grep -m 2 -E '^(model name|flags|Features)' /proc/cpuinfo 2>/dev/null || true)" ;;
esac
key=$(printf '%s\n%s\n%s' "$version" "$cmake_args" "$machine" | sha1sum | cut -c1-12)
if [ -n "${FINETUNE_WHEEL_CACHE:-}" ]; then
  cache_root=$FINETUNE_WHEEL_CACHE
elif [ -n "${XDG_CACHE_HOME:-}" ]; then
  cache_root=$XDG_CACHE_HOME/finetune/wheels
elif [ -n "${HOME:-}" ]; then
  cache_root=$HOME/.cache/finetune/wheels
else
  cache_root=""
fi
cache=$cache_root/llama-cpp-python-$key
if [ -z "$cache_root" ] || ! mkdir -p "$cache" 2>/dev/null; then
  cache=$(mktemp -d "${TMPDIR:-/tmp}/llama-cpp-python-$key.XXXXXX")
  echo "note: no writable cache folder (${cache_root:-HOME unset}); the wheel is built in $cache and not kept (set FINETUNE_WHEEL_CACHE)"
fi
wheel=$(ls "$cache"/llama_cpp_python-"$version"-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  echo "building llama-cpp-python $version ($cmake_args); about 6 minutes on 2 cores, once"
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
