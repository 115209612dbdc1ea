#!/usr/bin/env bash
# The GPU device suite (benchmarks/device_suite.py): ceilings, Pallas kernels and cuDNN attention
# against the reference, log-prob fwd+bwd, a DPO step's MFU, sampling tokens/s. Within 8 minutes.
#
#   bash benchmarks/device_suite.sh          # on a GPU machine; the table is printed last and
#                                            # $OUT/device_suite.json (when OUT is set) gets it all
#   bash benchmarks/device_suite.sh --dry    # every code path on CPU at tiny sizes (seconds)
#
# What jaxalign needs beyond the machine's own packages (grain, ml_collections, tensorboardX on the
# H200 image) is installed from the repository's .whl/ (benchmarks/fetch_device_wheels.sh fills
# it) into /tmp/jaxalign-site with --no-deps, so the image's jax and torch are never touched.
# PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import grain, ml_collections, tensorboardX" 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "jaxalign: grain, ml_collections or tensorboardX is missing and .whl/ holds no wheels;" \
      "run benchmarks/fetch_device_wheels.sh where PyPI is reachable" >&2
    exit 2
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/jaxalign-site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/jaxalign-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
# A failed import is reported here and again by each part that needs the module; the others run.
"$PYTHON" -c "import jaxalign.train, jaxalign.sampling" ||
  echo "jaxalign: import failed (above); the parts that need it will fail" >&2
exec "$PYTHON" benchmarks/device_suite.py "$@"
