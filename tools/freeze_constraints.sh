#!/usr/bin/env bash
# Write constraints.txt: the exact versions of everything `make setup` installs beside torch,
# resolved anew in a scratch venv. Run by `make lock`, deliberately, followed by `make test`:
# a new transformers or peft release reaches users only through this file (issue 28: peft
# 0.21.2 on transformers 5.24 silently dropped the prefix at generation).
#
# Usage: tools/freeze_constraints.sh PYTHON
# Not pinned here: torch and its CUDA packages (a GPU user's own build is kept), and what the
# Makefile pins itself (llama-cpp-python, built from source; the embedded model's wheel).
set -euo pipefail
python=$1
scratch=$(mktemp -d "${TMPDIR:-/tmp}/finetune-lock.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
"$python" -m venv "$scratch/venv"
pip="$scratch/venv/bin/python -m pip"
$pip install -q --upgrade pip
$pip install -q torch==2.13.0
# diskcache: llama-cpp-python's one requirement that nothing else brings in
$pip install -q -e '.[dev]' diskcache
{
  echo "# Written by tools/freeze_constraints.sh (make lock) on $(date -u +%Y-%m-%d); see there."
  $pip freeze --exclude-editable |
    grep -v -i -E '^(torch|triton|nvidia-|cuda-|llama[-_]cpp[-_]python|llm[-_]smollm2)'
} >constraints.txt.new
mv constraints.txt.new constraints.txt
