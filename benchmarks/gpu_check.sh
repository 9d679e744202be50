#!/usr/bin/env bash
# One prepared GPU session: correctness on the device, then the GPU benchmarks.
# Run on a machine with a GPU from the repository root; wheels of missing pure-Python
# dependencies (pyro-ppl, pyro-api) may be placed in .whl/.
set -uo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
cd benchmarks
python3 gpu_smoke.py
python3 groupsum.py --device cuda
python3 dense.py --device cuda
python3 scaling.py --device cuda --repeats 5 --max-baseline-gb 24
