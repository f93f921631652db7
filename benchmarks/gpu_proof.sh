#!/usr/bin/env bash
# The GPU proof in one command, sized for one short lease of a bare GPU machine (no network): <= 9 minutes.
#
#   bash benchmarks/gpu_proof.sh --prepare     # here, once (network): wheels + CIFAR-10 parquet -> benchmarks/gpu_carry/
#   bash benchmarks/gpu_proof.sh               # there: every result JSON into $OUT (else benchmarks/results/)
#   bash benchmarks/gpu_proof.sh --smoke [--out-dir DIR] [--data PARQUET]   # the same chain on CPU, tiny, in seconds
#
# Measures, in this order (the longest and most important first, the others capped by what is left of 9 minutes):
#   (c) benchmarks/vs_timm.py: vitforge against the timm pipeline, 3 minutes each, cold start    -> vs_timm_<gpu>.json/png
#   (a) benchmarks/train_throughput.py: model-step throughput ours vs timm, minivit / deit_kd / the
#       dim-256 depth-12 ViT (eager: compiling six models would not fit the lease)           -> train_throughput_<gpu>.json
#   (b) benchmarks/aug_pipeline.py: the augmentation pipeline alone (device path vs 8 workers)   -> aug_pipeline_<gpu>.json
#   (d) benchmarks/scan.py: the selective-scan forms on CUDA                                     -> scan_<gpu>.json
# and gpu_proof.log (everything printed) beside them. Results keep hardware, versions, command, date and the commit
# (benchmarks/gpu_carry/COMMIT, written by --prepare, since the device copy of the tree has no git).
#
# The bare machine has torch, torchvision, timm, pyarrow, scikit-learn, matplotlib, pyyaml; omegaconf and the fastapi
# stack the CLI imports are missing and travel as wheels (installed with --no-index into a private folder). vitforge itself runs from this tree's src/ (the
# copy that travels is always the current code). The device tool must carry the git-ignored folder:
#   run(command="bash benchmarks/gpu_proof.sh", carry=["benchmarks/gpu_carry"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
CARRY=benchmarks/gpu_carry
PYTHON=${PYTHON:-python3}
MODE=run
DEST=""
DATA=""
TOTAL_S=540          # the whole proof, seconds
VS_BUDGET=180        # seconds per contestant in (c)
while [ $# -gt 0 ]; do
  case "$1" in
    --prepare) MODE=prepare ;;
    --smoke) MODE=smoke ;;
    --out-dir) DEST=$2; shift ;;
    --data) DATA=$2; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_proof.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [ "$MODE" = prepare ]; then
  # wheels the bare machine lacks (Python 3.12, x86-64), the data, the commit; then check the 64 MiB travel limit
  src=${DATA:-$REPO/../shared/data/cifar10/train.parquet}
  [ -f "$src" ] || { echo "gpu_proof.sh --prepare: $src not found (pass --data PARQUET)" >&2; exit 2; }
  rm -rf "$CARRY" && mkdir -p "$CARRY/wheels" "$CARRY/cifar10"
  # absent from the GPU image (the device tool's package list): omegaconf (config), and what `vitforge train` imports
  # through the CLI's serve verb (fastapi and its stack); typing-extensions new enough for that pydantic. Versions from
  # requirements/lock.txt.
  pins=()
  for name in omegaconf fastapi starlette pydantic pydantic_core annotated-types typing-inspection uvicorn \
              python-multipart opentelemetry-api anyio typing_extensions; do
    pin=$(grep -i "^${name}==" requirements/lock.txt) || { echo "no pin for $name in requirements/lock.txt" >&2; exit 1; }
    pins+=("$pin")
  done
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY/wheels" "${pins[@]}"
  cp "$src" "$CARRY/cifar10/train.parquet"
  git rev-parse HEAD > "$CARRY/COMMIT"
  tree=$(git ls-files -z -co --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  carry=$(du -sb "$CARRY" | cut -f1)
  echo "prepared $CARRY: $(ls "$CARRY/wheels" | tr '\n' ' ')+ train.parquet; tree $((tree / 1048576)) MiB +" \
       "carry $((carry / 1048576)) MiB of 64"
  if [ $((tree + carry)) -ge $((64 * 1048576)) ]; then echo "over the 64 MiB a device call carries" >&2; exit 1; fi
  exit 0
fi

if [ "$MODE" = smoke ]; then
  DEST=${DEST:-$(mktemp -d /tmp/gpu_proof_smoke.XXXXXX)}
  DEVICE=cpu
  DATA=${DATA:-$REPO/../shared/data/cifar10/train.parquet}
else
  DEST=${DEST:-${OUT:-$REPO/benchmarks/results}}
  DEVICE=cuda
  DATA=${DATA:-$CARRY/cifar10/train.parquet}
fi
mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)
WORK=$(mktemp -d /tmp/gpu_proof_work.XXXXXX)   # never under $DEST: only a few files come back from a device
LOG=$DEST/gpu_proof.log
export VITFORGE_RESULTS_DIR=$DEST PYTHONUNBUFFERED=1
export PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH}
[ -f "$CARRY/COMMIT" ] && export VITFORGE_GIT_COMMIT=${VITFORGE_GIT_COMMIT:-$(cat "$CARRY/COMMIT")}
: > "$LOG"
say() { echo "[gpu_proof $(date +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }

if ! "$PYTHON" -c "import omegaconf, fastapi, uvicorn, multipart" 2>/dev/null; then
  ls "$CARRY"/wheels/*.whl >/dev/null 2>&1 || { say "omegaconf missing and no wheels: run --prepare first"; exit 2; }
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
    "$CARRY"/wheels/*.whl >>"$LOG" 2>&1
  export PYTHONPATH=$PYTHONPATH:$WORK/site
  say "installed $(ls "$CARRY/wheels" | tr '\n' ' ')"
  "$PYTHON" -c "import omegaconf, fastapi, uvicorn, multipart" >>"$LOG" 2>&1 || say "the carried wheels do not import"
fi
[ -f "$DATA" ] || { say "no data at $DATA (--prepare copies it, or pass --data)"; exit 2; }
"$PYTHON" -c "import torch, vitforge; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$LOG"

# train.budget when this vitforge has it, else the epoch count from a probe run
VF_MODE=$("$PYTHON" -c "import sys; sys.path.insert(0, 'benchmarks'); import vs_timm; \
print('budget' if vs_timm.vitforge_has_budget() else 'epochs')")
status=0
part() {  # part NAME SECONDS CMD...: run with a time cap, keep going on failure
  local name=$1 cap=$2; shift 2
  if [ "$cap" -le 5 ]; then say "$name: skipped, no time left"; status=1; return; fi
  say "$name: start (cap ${cap}s)"
  if timeout --signal=INT --kill-after=10 "$cap" "$@" >>"$LOG" 2>&1; then say "$name: done"
  else say "$name: FAILED or cut at ${cap}s (exit $?)"; status=1; fi
}
left() { echo $((TOTAL_S - SECONDS - $1)); }   # seconds left, keeping $1 in reserve

if [ "$MODE" = smoke ]; then
  part vs_timm 150 "$PYTHON" benchmarks/vs_timm.py --device cpu --budgets 8 --contestants vitforge timm \
    --data "$DATA" --subset 96 --val-split 40 --batch 16 --eval-batch 100 --probe-steps 1 --probe-warmup 1 \
    --workers 1 --eval-points 1 --vitforge-mode "$VF_MODE" --vitforge-set train.compile=off \
    --vitforge-set schedule.warmup_epochs=0 \
    --out vs_timm_cpu_smoke --workdir "$WORK/vs_timm"
  part train_throughput 60 "$PYTHON" benchmarks/train_throughput.py --device cpu --batch 4 --steps 1 --warmup 0 \
    --repeats 1 --out train_throughput_cpu_smoke
  part aug_pipeline 60 "$PYTHON" benchmarks/aug_pipeline.py --device cpu --synthetic --policies none \
    --worker-policies none --workers --batch 64 --batches 1 --repeats 1 --out aug_pipeline_cpu_smoke
  part scan 60 "$PYTHON" benchmarks/scan.py --device cpu --models mambavision_cifar --images 1 --reps 1 --chunks 4 \
    --name scan_cpu_smoke
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$LOG" 2>&1 || true
  part vs_timm $(left 150) "$PYTHON" benchmarks/vs_timm.py --device cuda --budgets "$VS_BUDGET" \
    --contestants vitforge timm --data "$DATA" --vitforge-mode "$VF_MODE" --workdir "$WORK/vs_timm"
  part train_throughput $(left 90) "$PYTHON" benchmarks/train_throughput.py --device cuda --modes off \
    --pairs minivit deit_kd vit256 --steps 30 --warmup 5 --repeats 3
  part aug_pipeline $(left 40) "$PYTHON" benchmarks/aug_pipeline.py --device cuda --data "$DATA" \
    --policies none autoaugment --worker-policies autoaugment --workers 8 --batches 40 --repeats 2
  part scan $(left 0) "$PYTHON" benchmarks/scan.py --device cuda --images 64 --chunks 16 32 64 --reps 5
fi
rm -rf "$WORK"
say "results in $DEST: $(cd "$DEST" && ls | tr '\n' ' ')"
exit $status
