#!/usr/bin/env bash
# Downloads into .whl/ the wheels that benchmarks/device_suite.sh installs on a GPU machine with no
# internet: the jaxalign dependencies its image lacks (grain and its compiled array_record,
# portpicker, ml_collections, tensorboardX), for CPython 3.12 on x86-64 Linux. Run once, from the
# repository root, on a machine that reaches PyPI; .whl/ is git-ignored (.git/info/exclude) and
# travels with the run. Versions are the ones the development venv holds.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-python3 -m pip}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
$PIP download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0 tensorboardX==2.6.5
ls -l .whl
