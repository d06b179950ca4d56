#!/usr/bin/env bash
# Install NVIDIA Transformer Engine on a GPU machine that has no network, from files carried there
# (the lent device machines: device calls carry < 64 MiB each, TE's core wheel is ~276 MB).
#
# Layout this script expects (git-ignored, one folder per device call, ignored files stay on the
# machine while it is warm):
#   .dev/te/p0 .. p3   te_cu13.part00 .. part03   (the transformer_engine_cu13 wheel split in 60 MiB)
#   .dev/te/p4         te_cu13.part04, SHA256SUMS, transformer_engine-<v>-py3-none-any.whl,
#                      transformer_engine_torch-<v>.tar.gz (sdist: built here against this torch),
#                      and the wheels the build and TE's import need beyond torch: wheel, packaging, einops,
#                      nvidia-cuda-crt and nvidia-cuda-cccl (crt/ and nv/ headers torch's nvidia-* wheels lack),
#                      and TE's import-time dependencies: pydantic (+ pydantic_core, annotated_types,
#                      typing_inspection), onnx, onnxscript (+ onnx_ir, ml_dtypes, protobuf)
# Prepare on a networked machine with:  pip download --no-deps transformer_engine_cu13==<v>
#   transformer_engine==<v>; pip download --no-deps --no-binary :all: transformer_engine_torch==<v>;
#   pip download --no-deps wheel packaging einops "nvidia-cuda-crt==<torch's CUDA>.*" "nvidia-cuda-cccl==<same>.*"
#     pydantic pydantic_core annotated_types typing_inspection onnx onnxscript onnx_ir ml_dtypes protobuf;
#   split -b 60M -d -a 2 <cu13 wheel> te_cu13.part; sha256sum * > SHA256SUMS
#
# Usage (on the GPU machine, repo root):  bash benchmarks/gpu_te_setup.sh [SITE=/tmp/site]
# Afterwards: export PYTHONPATH=$SITE:$PWD and check `python3 -c "import transformer_engine.pytorch"`.
# Cluster users do not need this: the NGC PyTorch container ships TE (see README, "Cluster setup").
set -euo pipefail
SITE=${1:-/tmp/site}
SRC=.dev/te
WORK=/tmp/te_build
mkdir -p "$WORK" "$SITE"
for i in 0 1 2 3 4; do
  [ -d "$SRC/p$i" ] || { echo "missing $SRC/p$i: carry it in an earlier device call" >&2; exit 2; }
done
cp "$SRC"/p4/SHA256SUMS "$SRC"/p4/*.whl "$SRC"/p4/*.tar.gz "$WORK"/
cp "$SRC"/p*/te_cu13.part0* "$WORK"/
cd "$WORK"
grep -v ' SHA256SUMS$' SHA256SUMS | sha256sum -c --quiet
version=$(ls transformer_engine_torch-*.tar.gz | sed 's/transformer_engine_torch-\(.*\)\.tar\.gz/\1/')
core="transformer_engine_cu13-${version}-py3-none-manylinux_2_28_x86_64.whl"
cat te_cu13.part0* > "$core"
echo "[te] joined $core ($(du -h "$core" | cut -f1)); installing core + meta + helpers into $SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$core" \
  "transformer_engine-${version}-py3-none-any.whl" $(ls *.whl | grep -v '^transformer_engine\|^nvidia_')
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
echo "[te] building transformer_engine_torch $version against torch $(python3 -c 'import torch; print(torch.__version__)')"
tar xzf "transformer_engine_torch-${version}.tar.gz"
# No build isolation: the extension must link against this machine's torch (and there is no network).
# FORCE_BUILD: do not try to download a prebuilt wheel from GitHub first (no network: it would only
# wait for the timeout). The extension is C++ only (33 files), so the CUDA arch list does not matter.
# CUDA/NCCL headers: from torch's own nvidia-* wheels when present (they match torch's CUDA), else the
# toolkit under CUDA_HOME.
# The wheels lack crt/*.h and nv/*: those come from nvidia-cuda-crt/-cccl, kept out of $SITE (a second nvidia/ there
# would shadow torch's in the namespace TE's build scans) and put on the compiler's CPATH.
if python3 -c "import nvidia" 2>/dev/null; then
  export NVTE_BUILD_USE_NVIDIA_WHEELS=${NVTE_BUILD_USE_NVIDIA_WHEELS:-1}
  if ls nvidia_cuda_*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$WORK/crt" nvidia_cuda_*.whl
    export CPATH="$(echo "$WORK"/crt/nvidia/cu*/include)${CPATH:+:$CPATH}"
  fi
fi
# Its wheel puts the extension into transformer_engine/wheel_lib/, a folder the core wheel already
# created: pip --target would skip it ("already exists"), so build into a folder of its own and copy.
NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_FRAMEWORK=pytorch MAX_JOBS=${MAX_JOBS:-16} python3 -m pip install -v --no-index --no-deps \
  --no-build-isolation --no-cache-dir --target "$WORK/te_torch" "./transformer_engine_torch-${version}" \
  > "$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
cp "$WORK"/te_torch/transformer_engine/wheel_lib/transformer_engine_torch*.so "$SITE/transformer_engine/wheel_lib/"
cp -r "$WORK"/te_torch/transformer_engine_torch-*.dist-info "$SITE/"
python3 - <<'EOF'
import torch
import transformer_engine.pytorch as te
try:  # what our TE spec uses (megatron may not be on the path yet)
    from megatron.core.transformer.moe.experts import TEGroupedMLP  # noqa: F401
    mcore = "megatron's TEGroupedMLP imports"
except ImportError as e:
    mcore = f"megatron not checked ({e})"
try:
    from transformer_engine.pytorch.fp8 import check_fp8_support
    fp8 = check_fp8_support()
except Exception as e:  # no GPU here, or an older API
    fp8 = f"unknown ({type(e).__name__})"
print("[te] transformer_engine.pytorch imports;", mcore + "; FP8 support:", fp8)
EOF
