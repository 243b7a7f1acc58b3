#!/usr/bin/env bash
# One call on the lent GPU machine: install the carried wheels, build diffrt's extension, run the
# GPU tests, the benchmarks, `diffrt demo` on the GPU and the CPU test tier; logs and JSON go to DIR.
#
#   bash bench/gpu.sh DIR            (on the device: bash bench/gpu.sh "$OUT")
#
# Files written to DIR (the device tool brings back at most 8): gpu.log (everything this script
# printed, the benchmark tables included), build.log, tests.log, and one JSON per benchmark
# (<gpu>-<yyyymmdd>-<topic>.json). Stages that fail do not stop the later ones; the exit status
# is 1 when any stage failed or timed out.
#
# Environment (all optional):
#   PYTHON             interpreter (default python3: the device's torch venv)
#   GPU_SH_BUDGET      seconds for the whole script (default 560: the device allows 600 per call)
#   GPU_SH_STAGES      comma-separated stages to run after the build (default: all): tests-gpu,
#                      bench-sampler, bench-attention, bench-int8, bench-stream, bench-conditional, bench-cli,
#                      bench-pipeline, demo, tests-cpu-tier (split a long run
#                      over two device calls)
#   DIFFRT_CUDA_ARCHS  CUDA architectures to build (default 90a: H100 / H200)
#   DIFFRT_GIT_SHA     the git SHA to stamp results with (the device copy has no .git)
#   DIFFRT_GIT_DIRTY   1 / 0, likewise
#   BENCH_ARGS         extra arguments for diffrt.bench.bench_sampler (e.g. "--solvers ddim,unipc")
#   ATTENTION_ARGS     extra arguments for diffrt.bench.bench_attention (e.g. "--cases sd15-512-l0,dit-xl-512")
#   INT8_ARGS          arguments for diffrt.bench.bench_int8 (default "--e2e"; e.g. "--batches 2")
#   BENCH_CLI_MODELS   models for `diffrt tune` + `diffrt bench` (default sd15-unet: the issue-9 goal's shape, 512^2, CFG 7.5)
#   TUNE_FLOOR         diffrt tune's PSNR floor in dB (default 30)
#   BENCH_CLI_ARGS     extra arguments for `diffrt bench` (e.g. "--configs diffusers-eager,exact,graphs --batch 2")
#   BENCH_PIPELINE_MODELS  models for `diffrt bench --pipeline` (default "sd15-unet sdxl-unet flux-like"; the
#                      pipeline classes need transformers: carry its wheel and its dependencies' with diffusers')
#   PYTEST_WORKERS     xdist workers for the CPU tier (default 8; 0 runs it in one process)
set -u -o pipefail

DIR=${1:?usage: bash bench/gpu.sh DIR}
mkdir -p "$DIR" || exit 2
DIR=$(cd "$DIR" && pwd)
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)

export PYTHONUNBUFFERED=1
export DIFFRT_CUDA_ARCHS=${DIFFRT_CUDA_ARCHS:-90a}
PY=${PYTHON:-python3}
BUDGET=${GPU_SH_BUDGET:-560}
START=$(date +%s)
RESULTS=()
FAILED=0

elapsed() { echo $(( $(date +%s) - START )); }

# stage NAME LIMIT_S LOGFILE CMD... : run CMD under timeout (capped by the budget left), output
# appended to LOGFILE ("-" = stdout); record its status; never stop the script.
stage() {
  local name=$1 limit=$2 logfile=$3; shift 3
  if [[ -n ${GPU_SH_STAGES:-} && ",$GPU_SH_STAGES," != *",$name,"* && $name != wheels && $name != build* && \
        $name != import ]]; then
    echo "=== $name: not in GPU_SH_STAGES"; return 0
  fi
  local left=$(( BUDGET - $(elapsed) ))
  (( limit > left )) && limit=$left
  if (( limit < 15 )); then
    echo "=== [$(elapsed)s] $name: SKIPPED, budget spent"
    RESULTS+=("$name: skipped (budget)"); FAILED=1; return 1
  fi
  echo "=== [$(elapsed)s] $name (limit ${limit}s): $*"
  local t0 rc
  t0=$(date +%s)
  if [[ $logfile == - ]]; then
    timeout -k 10 "$limit" "$@"; rc=$?
  else
    echo "=== [$(elapsed)s] $name: $*" >>"$logfile"
    timeout -k 10 "$limit" "$@" >>"$logfile" 2>&1; rc=$?
    if (( rc == 0 )); then tail -n 3 "$logfile"; else tail -n 40 "$logfile"; fi
  fi
  local took=$(( $(date +%s) - t0 ))
  (( rc == 124 || rc == 137 )) && echo "=== $name TIMED OUT after ${took}s"
  echo "=== [$(elapsed)s] $name: rc=$rc (${took}s)"
  RESULTS+=("$name: rc=$rc, ${took}s")
  (( rc != 0 )) && FAILED=1
  return "$rc"
}

environment() {
  echo "date: $(date -u +%FT%TZ)  dir: $ROOT  python: $($PY -V 2>&1)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu \
    --format=csv 2>&1 || echo "nvidia-smi failed"
  nvcc --version 2>&1 | tail -n 2 || echo "no nvcc"
  cmake --version 2>&1 | head -n 1 || echo "no cmake"
  $PY - <<'EOF'
import importlib.metadata as m, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", getattr(p, "L2_cache_size", "?"), "B L2")
for name in ("triton", "pip", "setuptools", "pybind11", "cmake", "pytest", "pytest-xdist", "pytest-timeout",
             "diffusers", "huggingface_hub", "safetensors", "numpy"):
    try:
        print(f"  {name} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"  {name} MISSING")
EOF
}

install_wheels() {
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "no .whl/*.whl carried: diffusers is missing, so parity tests skip and the diffusers baseline fails"
    return 1
  fi
  ls .whl
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}

# The package layout maps top-level folders into the diffrt namespace; if the editable install
# fails, build the extension in place and reach the folders through a namespace shim.
build_in_place() {
  $PY setup.py build_ext --inplace || return $?
  mkdir -p /tmp/diffrt_shim/diffrt
  for pkg in runtime kernels export; do ln -sfn "$ROOT/$pkg" "/tmp/diffrt_shim/diffrt/$pkg"; done
}

check_import() {
  $PY - <<'EOF'
import torch
from diffrt.kernels import registry
module, problem = registry.native()
print("diffrt.kernels._C:", "not built: " + str(problem) if module is None else
      f"HAVE_CUDA={module.HAVE_CUDA} CUDA_ARCHS={getattr(module, 'CUDA_ARCHS', '')}")
print("cuda backend:", registry.cuda_problem(0) or "usable")
raise SystemExit(0 if module is not None and registry.cuda_problem(0) is None else 1)
EOF
}

run_bench_sampler() {
  set -o pipefail
  # shellcheck disable=SC2086
  env TRITON_INTERPRET=0 $PY -m diffrt.bench.bench_sampler --out "$DIR" --device cuda ${BENCH_ARGS:-} 2>&1 |
    tee /tmp/bench_sampler.out
}

# bench_attention at the static profile's shapes (diffrt vs SDPA flash / efficient / cuDNN), then its
# measurements beside the roofline estimate of the newest static profile: DIR/roofline-measured.{json,md}.
run_bench_attention() {
  # shellcheck disable=SC2086
  env TRITON_INTERPRET=0 $PY -m diffrt.bench.bench_attention --out "$DIR" --device cuda ${ATTENTION_ARGS:-}
  local status=$? static
  static=$(ls "$ROOT"/bench/results/static-sm90-*-kernels.json 2>/dev/null | sort | tail -n 1)
  if [[ -n $static ]]; then
    $PY -m diffrt.bench.roofline --static "$static" --measured "$DIR" --out "$DIR/roofline-measured" &&
      cat "$DIR/roofline-measured.md"
  fi
  return $status
}

# diffrt tune (floor TUNE_FLOOR dB, default 30) then diffrt bench with every configuration and the tuned one:
# the issue-9 goals in one stage. The tuned config is copied to DIR (its calibration stays in /tmp).
run_bench_cli() {
  local model rc=0
  for model in ${BENCH_CLI_MODELS:-sd15-unet}; do
    local tuned=/tmp/diffrt-tuned/$model.json config=()
    if env TRITON_INTERPRET=0 $PY -m diffrt.runtime.cli tune --model "$model" --device cuda --quiet --batch 1 \
        --quality-floor "${TUNE_FLOOR:-30}" --out "$tuned"; then
      cp "$tuned" "$DIR/tuned-$model.json"
      config=(--config "$tuned")
    else
      rc=1
    fi
    # shellcheck disable=SC2086
    env TRITON_INTERPRET=0 $PY -m diffrt.runtime.cli bench --model "$model" --device cuda --quiet --out "$DIR" \
      "${config[@]}" ${BENCH_CLI_ARGS:-} || rc=1
  done
  return $rc
}

# diffrt bench --pipeline: each model inside its real diffusers pipeline class, diffusers eager / torch.compile /
# accelerate(pipe), whole pipeline calls.
run_bench_pipeline() {
  local model rc=0
  for model in ${BENCH_PIPELINE_MODELS:-sd15-unet sdxl-unet flux-like}; do
    env TRITON_INTERPRET=0 $PY -m diffrt.runtime.cli bench --model "$model" --pipeline --device cuda --quiet \
      --out "$DIR" || rc=1
  done
  return $rc
}

main() {
  echo "=== bench/gpu.sh -> $DIR (budget ${BUDGET}s)"
  environment
  if stage wheels 120 - bash -c install_wheels; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  if ! stage build 240 "$DIR/build.log" $PY -m pip install -v --no-build-isolation --no-deps --no-index -e .; then
    echo "editable install failed; trying build_ext --inplace with a namespace shim"
    stage build-inplace 200 "$DIR/build.log" bash -c build_in_place &&
      export PYTHONPATH=/tmp/diffrt_shim${PYTHONPATH:+:$PYTHONPATH}
  fi
  stage import 60 - bash -c check_import

  local xdist=() timeout_flag=()
  $PY -c "import xdist" 2>/dev/null && (( ${PYTEST_WORKERS:-8} > 0 )) && xdist=(-n "${PYTEST_WORKERS:-8}")
  $PY -c "import pytest_timeout" 2>/dev/null && timeout_flag=(--timeout=300)
  # conftest defaults TRITON_INTERPRET to 1 (for CPU tensors); the GPU tier and the benchmarks
  # must compile Triton kernels for the GPU.
  # the autotuner would compile several tiles per shape class of the tests: heuristic tiles there
  # (test_every_autotune_candidate_computes_the_same turns it on for its own cases)
  stage tests-gpu 180 "$DIR/tests.log" env TRITON_INTERPRET=0 DIFFRT_AUTOTUNE=0 \
    bash -c 'cd tests && exec "$@"' _ $PY -m pytest -q -rfEs -p no:cacheprovider "${timeout_flag[@]}" -m gpu .
  stage bench-sampler 200 - bash -c run_bench_sampler
  stage bench-attention 300 - bash -c run_bench_attention
  stage bench-int8 200 - env TRITON_INTERPRET=0 $PY -m diffrt.bench.bench_int8 --out "$DIR" --device cuda ${INT8_ARGS:---e2e}
  stage bench-stream 200 - env TRITON_INTERPRET=0 $PY -m diffrt.bench.bench_stream --out "$DIR" --device cuda
  stage bench-conditional 150 - env TRITON_INTERPRET=0 $PY -m diffrt.bench.bench_conditional_graphs --out "$DIR" --device cuda
  stage bench-cli 400 - bash -c run_bench_cli
  stage bench-pipeline 300 - bash -c run_bench_pipeline
  stage demo 90 - env TRITON_INTERPRET=0 $PY -m diffrt.runtime.cli demo --out /tmp/diffrt-demo --device cuda
  stage tests-cpu-tier 240 "$DIR/tests.log" env OMP_NUM_THREADS=2 \
    bash -c 'cd tests && exec "$@"' _ $PY -m pytest -q -rfE -p no:cacheprovider "${timeout_flag[@]}" "${xdist[@]}" -m "not gpu" .

  if [[ -s /tmp/bench_sampler.out ]]; then
    echo "=== bench-sampler table (again, so that the output tail holds it)"
    sed -n '/^sampler cost per step/,$p' /tmp/bench_sampler.out
  fi
  echo "=== summary after $(elapsed)s"
  printf '  %s\n' "${RESULTS[@]}"
  ls -la "$DIR"
  return "$FAILED"
}

# timeout(1) runs programs, not shell functions: export them and call them through bash -c.
export -f install_wheels build_in_place check_import run_bench_sampler run_bench_attention run_bench_cli run_bench_pipeline
export PY ROOT DIR

main 2>&1 | tee "$DIR/gpu.log"
exit "${PIPESTATUS[0]}"
