#!/usr/bin/env bash
# GPU device check: SDXL-architecture InstantID (random weights) at 1024², 30 steps, on one lent
# H100/H200 (PyTorch + CUDA, onnx, ONNX Runtime CPU, no TensorRT, no internet).
#
#   bash benchmarks/device_check.sh            # writes everything under $OUT (default ./device_out)
#   MODEL=tiny RES=64 STEPS=2 RUNS=1 LOOP=auto bash benchmarks/device_check.sh   # CPU rehearsal
#
# Steps (each time-boxed with `timeout`; a failing step is recorded and the script goes on):
#   1. machine + installs: .whl/*.whl carried in the repo root (the image has torch, transformers,
#      onnx, onnxruntime, pytest; carry diffusers, and tensorrt-rtx for step 4), installed with
#      pip --no-index --no-deps --target /tmp/site; then the CUDA-only tests (one-graph loop over
#      torch sessions, scheduler graphs, device face analysis), which skip on a CPU
#   2. scratch build: assets + manifest for sdxl --random-init (small components only; the UNet,
#      ControlNet and VAE are served by torch sessions, so their entries are registered without ONNX)
#   3. python -m benchmarks.latency: PyTorch baseline vs the runtime over torch sessions (CUDA-graph
#      loop), 1024², 30 steps, median of 3 runs; checks the final latents against the baseline
#   4. TensorRT-RTX, only if its wheel was carried and time is left (tiny build, engines, latency)
#   5. torch.export programs (tiny, if time is left): the torch backend's one-graph loop on CUDA and
#      the device face analysis, against ONNX Runtime on the CPU
#   6. $OUT/device_check.md: a short table of every step (status, seconds) + the latency tables
# Budget: about 8 minutes in all.
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
OUT=${OUT:-$REPO/device_out}
PY=${PYTHON:-python3}
MODEL=${MODEL:-sdxl}
RES=${RES:-1024}
STEPS=${STEPS:-30}
RUNS=${RUNS:-3}
LOOP=${LOOP:-graph}
BUDGET_S=${BUDGET_S:-470}
BUILD=${BUILD_DIR:-/tmp/instantrt_device_build/$MODEL}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$BUILD"
SUMMARY="$OUT/steps.tsv"
printf 'step\tstatus\tseconds\n' > "$SUMMARY"

# step NAME LIMIT_S CMD...: run CMD under `timeout`, log to $OUT/NAME.log, record status and time.
step() {
  local name=$1 limit=$2
  shift 2
  local begin=$SECONDS status
  echo "== $name (limit ${limit}s, at ${SECONDS}s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  status=$?
  case $status in
    0) status=ok ;;
    124|137) status="timeout(${limit}s)" ;;
    *) status="failed($status)" ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - begin))" >> "$SUMMARY"
  echo "   $status in $((SECONDS - begin))s"
  tail -n 3 "$OUT/$name.log"
  [ "$status" = ok ]
}

left() { echo $((BUDGET_S - SECONDS)); }

# 1. machine and installs ------------------------------------------------------------------------
step machine 30 bash -c "nvidia-smi; $PY -c 'import torch; print(torch.__version__, torch.cuda.is_available(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'"
if compgen -G ".whl/*.whl" > /dev/null; then
  step install 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
step imports 60 "$PY" -c "import diffusers, transformers, onnx, onnxruntime, torch; import export.build, \
runtime.pipelines, benchmarks.latency"
step cuda 30 "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'"
step gpu_tests 120 "$PY" -m pytest -q -p no:cacheprovider -k cuda tests/test_runtime_loop.py \
  tests/test_schedulers.py tests/test_face_device.py

# 2. scratch build: assets + manifest -------------------------------------------------------------
step build 150 "$PY" -m export.build --model "$MODEL" --random-init --pipeline instantid --stage onnx \
  --components text_encoder --out "$BUILD"
step register 30 "$PY" - "$BUILD" "$MODEL" <<'EOF'
"""Register the components the torch sessions serve (no ONNX: never opened with ONNX Runtime)."""
import sys

from engine.manifest import Component, update_manifest

def register(manifest):
    for name in ("text_encoder_2", "face_proj", "controlnet", "unet_instantid", "vae_decoder"):
        manifest.components.setdefault(name, Component())

update_manifest(sys.argv[1], sys.argv[2], register)
EOF

# 3. baseline vs runtime (torch sessions, CUDA graphs) -------------------------------------------
LIMIT=$(( $(left) > 330 ? 330 : $(left) ))
step latency "$LIMIT" "$PY" -m benchmarks.latency --build "$BUILD" --model "$MODEL" --backend torch \
  --trust-torch-programs --baseline torch --pipeline instantid --steps "$STEPS" --resolution "$RES" --batch 1 --runs "$RUNS" \
  --warmup 1 --loop "$LOOP" --out "$OUT/latency"

# 4. TensorRT-RTX, if carried and time is left ----------------------------------------------------
if "$PY" -c "import tensorrt_rtx" > /dev/null 2>&1 && [ "$(left)" -gt 150 ]; then
  TINY=/tmp/instantrt_device_build/tiny
  # the face models stay on ONNX Runtime (the int8 YuNet does not parse in TensorRT-RTX)
  step rtx_build "$(( $(left) - 60 ))" "$PY" -m export.build --model tiny --pipeline instantid --stage all \
    --backend tensorrt-rtx --components text_encoder text_encoder_2 face_proj controlnet unet_instantid \
    vae_decoder --out "$TINY" \
    && step rtx_latency "$(( $(left) > 20 ? $(left) : 20 ))" "$PY" -m benchmarks.latency --build "$TINY" \
      --backend tensorrt-rtx,onnxruntime --pipeline instantid --steps 4 --resolution 512 --runs 3 \
      --out "$OUT/rtx"
else
  printf 'rtx\tskipped (no tensorrt_rtx wheel or no time)\t0\n' >> "$SUMMARY"
fi

# 5. torch.export programs on the GPU (tiny), if time is left: the torch backend's CUDA-graph loop ----
if [ "$(left)" -gt 150 ]; then
  PROGRAMS=/tmp/instantrt_device_build/tiny_programs
  step programs_export "$(( $(left) - 60 ))" bash -c "'$PY' -m export.build --model tiny --pipeline instantid \
--stage torch --out '$PROGRAMS' && '$PY' -m export.build --model tiny --pipeline instantid --stage onnx \
--weights '$PROGRAMS/weights' --out '$PROGRAMS'" \
    && step programs_generate "$(( $(left) > 30 ? $(left) : 30 ))" "$PY" - "$PROGRAMS" "$LOOP" <<'EOF'
"""InstantID from the astronaut over torch.export programs on CUDA (one-graph loop) vs ONNX Runtime (CPU)."""
import sys

import skimage.data

from runtime.pipelines import InstantIDPipeline

build, loop = sys.argv[1:3]
gpu = InstantIDPipeline.from_build(build, "torch", loop_mode=loop, trust_programs=True)  # built just above
cpu = InstantIDPipeline.from_build(build, "onnxruntime", face_on_device=False)
kwargs = dict(steps=4, seed=1, width=256, height=256, num_images=2, return_latents=True)
for _ in range(2):  # capture, then replay
    result = gpu(skimage.data.astronaut(), "a person", **kwargs)
expected = cpu(skimage.data.astronaut(), "a person", **kwargs)
error = float((result.latents.cpu() - expected.latents).norm() / expected.latents.norm())
print(f"torch programs on {gpu.device}: loop path {gpu.loop.last_path}, face analysis "
      f"{type(gpu.face_analyzer).__name__}, latents rel to ONNX Runtime {error:.2e}")
assert error < 1e-2 and gpu.loop.last_path == ("eager" if loop == "auto" and gpu.device.type == "cpu" else
                                               "graph" if loop == "auto" else loop), (error, gpu.loop.last_path)
EOF
else
  printf 'programs\tskipped (no time)\t0\n' >> "$SUMMARY"
fi

# 6. summary -----------------------------------------------------------------------------------------
{
  echo "# Device check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null)"
  echo
  echo "| step | status | seconds |"
  echo "| --- | --- | --- |"
  tail -n +2 "$SUMMARY" | while IFS=$'\t' read -r name status seconds; do
    echo "| $name | $status | $seconds |"
  done
  for dir in "$OUT/latency" "$OUT/rtx"; do
    if [ -f "$dir/latency.md" ]; then
      echo
      cat "$dir/latency.md"
    elif [ -f "$dir/latency.partial.json" ]; then
      echo
      echo "$dir: cut short; the backends measured before the limit are in $dir/latency.partial.json"
    fi
  done
} > "$OUT/device_check.md"
cat "$OUT/device_check.md"
echo "total ${SECONDS}s"
