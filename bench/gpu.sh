#!/usr/bin/env bash
# One GPU check that fits in 10 minutes on one H100/H200 with no network:
#   1. makes finetune importable with the versions it is tested with, from wheels brought along in
#      bench/wheels (never from an index),
#   2. pytest tests/gpu (bf16 training, packed attention: torch varlen / flash vs sdpa, QLoRA 4-bit),
#   3. bench/packed_attention.py: packed attention alone, block-diagonal sdpa vs finetune's varlen path,
#   4. bench/gpu_throughput.py: full and LoRA fine-tune tokens/s and MFU on a 1.1B Llama shape, then
#      (time permitting) the full run again without finetune's packed path (sdpa-masked), with
#      trainer.chunked_loss=on, and with flex_attention.
#
# Two set-ups:
# - The GPU machine's python already has a CUDA torch (a CUDA image: the usual case). bench/wheels
#   then holds finetune's pure-Python dependencies at the tested versions, unpacked over that python
#   with --target (no resolver, nothing else touched). Prepare them on a machine with network
#   (Python minor of the GPU machine; 3.12 here); hydra's antlr4 4.9.3 exists only as an sdist:
#     PY=3.12; mkdir -p bench/wheels
#     pip download --no-deps --only-binary=:all: --python-version $PY --platform any \
#         --platform manylinux2014_x86_64 -d bench/wheels transformers==5.24.0 peft==0.21.2 \
#         datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hydra-core==1.3.8 omegaconf==2.3.1
#     pip wheel --no-deps -w bench/wheels antlr4-python3-runtime==4.9.3
#   (accelerate, huggingface_hub, tokenizers, safetensors, psutil, pyarrow, rich, pytest come with
#   such an image; add their wheels too where they do not. Optional: a flash_attn or bitsandbytes
#   wheel matching the image's torch/CUDA; without them their checks skip.)
# - No CUDA torch there: put a CUDA torch wheel and every dependency in bench/wheels; a venv is made
#   and `pip install --no-index --find-links bench/wheels -e .` resolves from them.
# Wheels are never committed (bench/wheels/.gitignore). Run: bash bench/gpu.sh
#
# Environment: PYTHON (default: .venv/bin/python if it has CUDA, else python3), GPU_SH_VENV (the venv
# of the second set-up; default /tmp/finetune-gpu-venv), OUT (logs; default bench/gpu-out),
# GPU_SH_BUDGET (seconds for the whole script; default 570).
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${GPU_SH_BUDGET:-570}
OUT=${OUT:-bench/gpu-out}
mkdir -p "$OUT"
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
PY=${PYTHON:-}
has_cuda_torch() { "$1" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && has_cuda_torch .venv/bin/python; then PY=.venv/bin/python; else PY=python3; fi
fi

if has_cuda_torch "$PY"; then
  if ls bench/wheels/*.whl >/dev/null 2>&1; then
    SITE=/tmp/finetune-gpu-site
    echo "== unpacking bench/wheels over $PY's packages (--target $SITE)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        bench/wheels/*.whl || { echo "error: could not install bench/wheels" >&2; exit 2; }
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
else
  echo "== no CUDA-enabled torch in $PY: installing from bench/wheels (offline)"
  if ! ls bench/wheels/torch-*.whl >/dev/null 2>&1; then
    echo "error: no CUDA torch in $PY and no torch wheel in bench/wheels; see the header of bench/gpu.sh" >&2
    exit 2
  fi
  VENV=${GPU_SH_VENV:-/tmp/finetune-gpu-venv}
  python3 -m venv "$VENV"
  PY="$VENV/bin/python"
  "$PY" -m pip install --no-index --find-links bench/wheels --quiet -e . pytest pytest-timeout \
    || { echo "error: offline install failed (a wheel missing in bench/wheels?)" >&2; exit 2; }
fi
"$PY" - <<'PYEOF'
import torch
assert torch.cuda.is_available(), "no CUDA device visible"
print(f"== {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
      f"bf16 {torch.cuda.is_bf16_supported()}")
for m in ("transformers", "peft", "accelerate", "hydra", "omegaconf", "finetune", "flash_attn", "bitsandbytes"):
    try:
        mod = __import__(m); print(f"   {m} {getattr(mod, '__version__', '?')} ({mod.__file__})")
    except ImportError:
        print(f"   {m}: not installed")
try:
    from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    print("   torch.nn.attention.varlen: yes (packed sdpa runs the varlen flash kernel)")
except ImportError:
    print("   torch.nn.attention.varlen: no (packed sdpa falls back to the block-diagonal mask)")
PYEOF
[ $? -eq 0 ] || { echo "error: the python above cannot see a CUDA GPU or import its packages" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader || true

echo "== pytest tests/gpu  (budget 150 s)"
timeout 150 "$PY" -m pytest -q tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/pytest-gpu.txt" \
  || echo "pytest tests/gpu FAILED or timed out (see above)"

echo "== bench/packed_attention.py  (budget 90 s)"
timeout 90 "$PY" bench/packed_attention.py 2>&1 | tee "$OUT/packed_attention.txt" || echo "packed_attention FAILED"

echo "== bench/gpu_throughput.py full,lora sdpa  (budget $(( $(left) - 20 )) s)"
timeout $(( $(left) - 20 )) "$PY" bench/gpu_throughput.py --work /tmp/finetune-gpu-bench 2>&1 \
  | tee "$OUT/gpu_throughput.txt" || echo "gpu_throughput FAILED or timed out"

# The A/B: full fine-tune without finetune's packed path, with the chunked loss on, and flex
# (which recompiles during its first ~20 steps: 2.5-4.5k tok/s at steps 1-20, 45k after, on an
# H200; hence the longer warm-up).
if [ "$(left)" -gt 150 ]; then
  echo "== bench/gpu_throughput.py full sdpa-masked,sdpa-chunked-loss,flex_attention  (budget $(( $(left) - 10 )) s)"
  timeout $(( $(left) - 10 )) "$PY" bench/gpu_throughput.py --work /tmp/finetune-gpu-bench --modes full \
    --attn sdpa-masked,sdpa-chunked-loss,flex_attention --steps 60 --warmup 20 2>&1 | tee "$OUT/gpu_throughput_ab.txt" || echo "A/B runs FAILED or timed out"
else
  echo "== skipped the A/B runs: $(left) s left"
fi
echo "== done in $(( $(date +%s) - START )) s; outputs in $OUT/"
