#!/usr/bin/env bash
# Download the wheels of benchmarks/device-wheels.txt into .whl/ (for the GPU machine: Python 3.12,
# manylinux x86_64, no network there), and check they fit the 64 MiB that can travel with the tree.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform any -d .whl -r benchmarks/device-wheels.txt
bytes=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo ".whl/: $(ls .whl/*.whl | wc -l) wheels, $((bytes / 1024)) KiB"
[ "$bytes" -le $((64 * 1024 * 1024)) ] || { echo "more than 64 MiB: trim benchmarks/device-wheels.txt"; exit 1; }
