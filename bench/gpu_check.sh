#!/usr/bin/env bash
# One run on a lent GPU machine (issue 18): the CUDA tests, then the benchmarks, each writing its
# figures as JSON under $OUT, the whole log in $OUT/log.txt.
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root
#   QUICK=1 OUT=/tmp/out bash bench/gpu_check.sh   # the same steps shrunk to seconds, on a CPU
#
# Environment on the GPU machine: a venv over the machine's own CUDA torch
# (--system-site-packages), the Python 3.12 wheels carried in $WHEELS (default .whl: pydantic,
# duckdb, webdataset, vector-quantize-pytorch, ...), the project on PYTHONPATH. No prefect or
# mlflow: nothing under stages/, models/ or warehouse/ imports them. No PyAV or FFmpeg either
# (their wheels would not fit the 64 MiB the device run carries): the tokenize benchmark reads
# frame shards prepared beforehand. The wheels (28 MB), made on the CPU machine:
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl pydantic==2.14.4 \
#     pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 \
#     duckdb==2.0.1 webdataset==1.0.2 braceexpand==0.1.7 vector-quantize-pytorch==1.32.0 einx==0.4.3 \
#     einops==0.8.2 torch-einops-utils==0.2.0 frozendict==2.5.1 loguru==0.7.3 ffmpeg-python==0.2.0 future==1.0.0
#
# Sections (SECTIONS="name ...", default $ALL below; $RERUN is what the second device run took)
# run in that order inside a time budget (BUDGET seconds, default 400); a section gets at most
# what is left and is skipped under 20 s. Two sections swap files in models/ for an A/B on the
# device's copy of the tree: `fix` puts .benchdata/backbone_nobreak.py over models/backbone.py (the
# graph-break fix of the first run, committed since), `ab-fast` times the small step with
# .benchdata/backbone_fast.py and puts the tree's file back. With QUICK=1 on a CPU, run those
# only in a copy of the repository. The frames for `tokenize` come from
# `python bench/tokenize_stage.py --prepare .benchdata/tok --videos 16 --seconds 20` (19 MB); the
# device run carries .whl and .benchdata (both listed in .git/info/exclude).
set -u
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to the folder for figures and the log}
mkdir -p "$OUT"
QUICK=${QUICK:-0}
BUDGET=${BUDGET:-400}
WHEELS=${WHEELS:-.whl}
START=$(date +%s)
REPO=$(pwd)

main() {
  echo "gpu_check: $(date -u +%FT%TZ) in $REPO, quick=$QUICK, budget ${BUDGET}s"
  if [ "$QUICK" = 1 ]; then
    PY=${PY:-$REPO/.venv/bin/python}
    DEV=cpu
    export VIMPAC_CUDA_TESTS_DEVICE=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  else
    DEV=cuda
    make_env || exit 1
    nvidia-smi || true
  fi
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
  $PY -c "import torch, pydantic, duckdb, webdataset, vector_quantize_pytorch, stages.pretrain.train, stages.finetune.evaluate, stages.tokenize.stage; print('imports ok; torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1
  for m in prefect mlflow av; do $PY -c "import $m" 2>/dev/null && echo "note: $m is importable here" ; done

  if [ "$QUICK" = 1 ]; then
    P_EAGER="--presets tiny --batch 2 --steps 1 --warmup 1 --threads 1"
    P_COMPILED="--presets tiny --batch 2 --steps 1 --warmup 1 --threads 1"
    TOK="--frames-home ${TOK_HOME:-/tmp/tokprep} --presets tiny --repeat 1"
    EVAL="--preset tiny --videos 4 --repeat 1 --warmup 0 --threads 1"
    STAGE="--workers 0 --steps 4"
    STAGE_STEPS=4
    TESTS_FIRST=(-k "not compiled")
    P_SMALL="--presets tiny --methods ours --batch 2 --steps 1 --warmup 1 --threads 1"
    P_BASE_BASELINE="--presets tiny --methods baseline --batch 2 --steps 1 --warmup 1 --threads 1"
    EVAL_SHORT=$EVAL
    PROF="--preset tiny --steps 1 --warmup 1" 
  else
    P_EAGER="--presets tiny,small,base"
    P_COMPILED="--presets small,base --no-baseline"
    TOK="--frames-home .benchdata/tok --presets base --repeat 3"
    EVAL="--preset small --videos 128 --repeat 2 --warmup 8"
    STAGE="--workers 2,8"
    STAGE_STEPS=30
    TESTS_FIRST=()
    P_SMALL="--presets small --methods ours"
    P_BASE_BASELINE="--presets base --methods baseline"
    EVAL_SHORT="--preset small --videos 32 --repeat 1 --warmup 1"
    PROF="--preset small --steps 3" 
  fi

  for name in ${SECTIONS:-$ALL}; do
    run_section "$name"
  done
  nvidia-smi --query-gpu=name,temperature.gpu,clocks.sm,power.draw --format=csv 2>/dev/null || true
  echo "gpu_check done after $(( $(date +%s) - START ))s"
}

make_env() {
  # A venv over the machine's python3. That python3 may itself be a venv (the one holding the CUDA
  # torch), whose packages --system-site-packages does not reach: then a .pth file adds them,
  # after the venv's own site-packages, so the carried wheels come first. The machine's pip
  # installs the wheels into the venv (a venv made without ensurepip has none).
  python3 -m venv --system-site-packages /tmp/venv 2>/dev/null || python3 -m venv --without-pip --system-site-packages /tmp/venv || return 1
  PY=/tmp/venv/bin/python
  local site
  site=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") || return 1
  if ! $PY -c "import torch" 2>/dev/null; then
    python3 -c "import site, sys; print('\n'.join(p for p in site.getsitepackages() + [site.getusersitepackages()] if p))" > "$site/host-packages.pth"
    echo "venv: the machine's packages reached through $site/host-packages.pth"
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl || return 1
  echo "venv: $PY with $(ls "$WHEELS"/*.whl | wc -l) carried wheels"
}

# The first device run (2026-12-04) ran $ALL; the second ran $RERUN.
ALL="env pretrain-eager cuda-tests tokenize evaluate fix pretrain-compiled pretrain-stage cuda-tests-compiled"
RERUN="profile cuda-tests-n4 small-ours ab-fast pretrain-compiled-small evaluate-short pretrain-stage-short tokenize-workers base-baseline"

run_section() {
  case $1 in
    env) section env 60 $PY bench/gpu_env.py --json "$OUT/env.json" $([ "$QUICK" = 1 ] && echo "--size 256") ;;
    pretrain-eager) section pretrain-eager 150 $PY bench/pretrain.py --device $DEV $P_EAGER --json "$OUT/pretrain_eager.json" ;;
    cuda-tests) section cuda-tests 120 $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider -rA "${TESTS_FIRST[@]}" ;;
    cuda-tests-n4) section cuda-tests 120 $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider -rA -n 4 "${TESTS_FIRST[@]}" ;;
    tokenize) section tokenize 120 $PY bench/tokenize_stage.py --device $DEV $TOK --json "$OUT/tokenize.json" ;;
    tokenize-workers) section tokenize-workers 90 $PY bench/tokenize_stage.py --device $DEV $TOK --workers 1,2 --json "$OUT/tokenize.json" ;;
    evaluate) section evaluate 120 $PY bench/evaluate.py --device $DEV $EVAL --json "$OUT/evaluate.json" ;;
    evaluate-short) section evaluate-short 90 $PY bench/evaluate.py --device $DEV $EVAL_SHORT --json "$OUT/evaluate.json" ;;
    fix)
      if [ -f .benchdata/backbone_nobreak.py ]; then
        echo "=== applying .benchdata/backbone_nobreak.py over models/backbone.py (graph-break fix under test)"
        diff models/backbone.py .benchdata/backbone_nobreak.py
        cp .benchdata/backbone_nobreak.py models/backbone.py
      fi ;;
    pretrain-compiled) section pretrain-compiled 200 $PY bench/pretrain.py --device $DEV $P_COMPILED --compile --json "$OUT/pretrain_compiled.json" ;;
    pretrain-compiled-small) section pretrain-compiled-small 150 $PY bench/pretrain.py --device $DEV $P_SMALL --compile --json "$OUT/pretrain_compiled.json" ;;
    pretrain-stage) section pretrain-stage 120 $PY bench/pretrain_stage.py --device $DEV $STAGE --json "$OUT/pretrain_stage.json" ;;
    pretrain-stage-short) section pretrain-stage 90 $PY bench/pretrain_stage.py --device $DEV $STAGE --steps $STAGE_STEPS --json "$OUT/pretrain_stage.json" ;;
    cuda-tests-compiled) section cuda-tests-compiled 120 $PY -m pytest tests/test_cuda.py -q -p no:cacheprovider -rA -k compiled ;;
    profile) section profile 60 $PY bench/profile_step.py --device $DEV $PROF --json "$OUT/profile.json" ;;
    small-ours) section small-ours 60 $PY bench/pretrain.py --device $DEV $P_SMALL ;;
    ab-fast)
      # The same small step with .benchdata/backbone_fast.py (q/k/v split by unbind/split instead of
      # indexing, [CLS] rows by expand), then the tree's backbone again.
      if [ -f .benchdata/backbone_fast.py ]; then
        cp models/backbone.py /tmp/backbone_tree.py
        cp .benchdata/backbone_fast.py models/backbone.py
        section ab-fast 60 $PY bench/pretrain.py --device $DEV $P_SMALL
        section ab-fast-profile 60 $PY bench/profile_step.py --device $DEV $PROF --json "$OUT/profile_fast.json"
        cp /tmp/backbone_tree.py models/backbone.py
      fi ;;
    base-baseline) section base-baseline 60 $PY bench/pretrain.py --device $DEV $P_BASE_BASELINE ;;
    *) echo "unknown section $1"; return 1 ;;
  esac
}

section() {
  local name=$1 max=$2
  shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  local t=$(( left < max ? left : max ))
  if [ "$t" -lt 20 ]; then
    echo "=== SKIP $name: ${left}s of the budget left"
    return
  fi
  local s0
  s0=$(date +%s)
  echo "=== $name (limit ${t}s, at +$(( s0 - START ))s): $*"
  timeout -k 5 "$t" "$@"
  local rc=$?
  echo "=== $name rc=$rc after $(( $(date +%s) - s0 ))s"
}

main 2>&1 | tee "$OUT/log.txt"
