#!/usr/bin/env bash
# One GPU check that fits in 10 minutes on one H100/H200 with no network:
#   1. installs what is missing from wheels brought along in bench/wheels (never from an index),
#   2. pytest tests/gpu (bf16 training, sdpa/flash packing equivalence, QLoRA 4-bit load),
#   3. bench/gpu_throughput.py: LoRA and full fine-tune tokens/s and MFU on a ~0.55B Llama shape.
#
# Preparing the wheels (on a machine WITH network, same CPU arch and Python minor as the GPU box;
# wheels are never committed — bench/wheels/ is git-ignored by bench/wheels/.gitignore):
#   PY=3.11   # python3 --version on the GPU machine
#   pip download -d bench/wheels --only-binary=:all: --python-version $PY \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#       --extra-index-url https://download.pytorch.org/whl/cu128 \
#       'torch==2.13.*' 'transformers==5.24.*' 'peft==0.21.*' 'accelerate==1.15.*' 'trl==1.16.*' \
#       datasets hydra-core omegaconf huggingface_hub safetensors tokenizers rich psutil numpy \
#       pyarrow pytest pytest-timeout bitsandbytes hatchling   # hatchling: builds `pip install -e .`
#   # optional, flash attention 2 (a prebuilt wheel matching torch/CUDA/Python, from its releases page):
#   #   cp flash_attn-*.whl bench/wheels/
# Then copy the repo (with bench/wheels) to the GPU machine and run:  bash bench/gpu.sh
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3), GPU_SH_VENV (where to
# create a venv when the system python lacks torch with CUDA; default /tmp/finetune-gpu-venv).
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
OUT=${OUT:-bench/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

has_cuda_torch() { "$1" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

if ! has_cuda_torch "$PY"; then
  echo "== no CUDA-enabled torch in $PY: installing from bench/wheels (offline)"
  if ! ls bench/wheels/torch-*.whl >/dev/null 2>&1; then
    echo "error: bench/wheels has no torch wheel; see the header of bench/gpu.sh for pip download" >&2
    exit 2
  fi
  VENV=${GPU_SH_VENV:-/tmp/finetune-gpu-venv}
  python3 -m venv "$VENV"
  PY="$VENV/bin/python"
fi
# Whatever is still missing (finetune itself, test deps, optional bitsandbytes / flash_attn).
PIP="$PY -m pip install --no-index --find-links bench/wheels --quiet"
if [ -d bench/wheels ]; then
  $PIP -e . pytest pytest-timeout || { echo "error: offline install failed (a wheel missing in bench/wheels?)" >&2; exit 2; }
  for opt in bitsandbytes flash_attn trl; do
    "$PY" -c "import $opt" 2>/dev/null || $PIP "$opt" 2>/dev/null || echo "note: $opt not available (its checks skip)"
  done
fi
"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "no CUDA device visible"
print(f"== {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
      f"bf16 {torch.cuda.is_bf16_supported()}")
for m in ("flash_attn", "bitsandbytes", "transformers", "peft", "accelerate"):
    try:
        mod = __import__(m); print(f"   {m} {getattr(mod, '__version__', '?')}")
    except ImportError:
        print(f"   {m}: not installed")
PYEOF
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader || true

echo "== pytest tests/gpu  (budget 240 s)"
timeout 240 "$PY" -m pytest -q tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.txt" || echo "pytest tests/gpu FAILED (see above)"

LEFT=$(( 570 - ($(date +%s) - START) ))
echo "== bench/gpu_throughput.py  (budget ${LEFT} s)"
timeout "$LEFT" "$PY" bench/gpu_throughput.py --work /tmp/finetune-gpu-bench 2>&1 | tee "$OUT/gpu_throughput.txt"
echo "== done in $(( $(date +%s) - START )) s; outputs in $OUT/"
