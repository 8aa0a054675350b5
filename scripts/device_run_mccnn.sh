#!/usr/bin/env bash
# One run of configs/mccnn.yaml (MC-CNN from random init: Ec, then the refiner) alone on a
# borrowed GPU machine, time-boxed, bringing back its metrics and learning curves in $OUT.
#
# Prepare here first: .venv/bin/python scripts/prepare_device_run.py   (builds device_payload/)
# Then the device tool: run(command="bash scripts/device_run_mccnn.sh",
#                           carry=["device_payload"], timeout_s=600)
#
# Steps: (1) install the carried wheels into a /tmp folder (the machine reaches no index); (2) check
# that torch sees the GPU and detectron2, thyroid_det and pycocotools import, and stop at once
# if not; (3) register the carried TN5000 (COCO JSON + WebP) through DATASETS.COCO_REGISTER;
# (4) train with tools/train_net.py under `timeout -s INT`, so that the script as a whole ends
# by BUDGET_S: an interrupted run still leaves metrics.json with every evaluation made so far
# (TEST.EVAL_PERIOD); (5) summary table, learning curves, and the files below into $OUT.
#
# Brought back ($OUT, at most 8 files): device_run.log (this script's output, training log
# included), summary.json (every evaluation's headline metrics; completed or cut), metrics.json,
# nodule_metrics.json (the last evaluation's clinical report), learning_curves.png, config.yaml,
# gpu.csv (utilisation and memory every 15 s), and model_final.pth only if under 16 MiB.
#
# Environment (defaults are the GPU run's):
#   BUDGET_S=540       seconds, from start to the end of copying; training gets what is left
#                      after the install and checks, less RESERVE_S=45 for the curves and copies
#   NUM_WORKERS=12     data-loader workers (16 cores: 12 mappers, the rest for the main process)
#   EXTRA_OPTS="..."   more KEY VALUE config overrides, appended last
#   PYTHON=python3     the interpreter (the machine's own holds torch)
#   DEVICE_RUN_TINY=1  a rehearsal on a CPU: a few images, 4 iterations, a tiny model (see below)
set -uo pipefail

cd "$(dirname "$0")/.."
T0=$(date +%s)
: "${OUT:?set OUT to the folder that comes back}"
PY=${PYTHON:-python3}
PAYLOAD=${PAYLOAD:-device_payload}
BUDGET_S=${BUDGET_S:-540}
RESERVE_S=${RESERVE_S:-45}
NUM_WORKERS=${NUM_WORKERS:-12}
TINY=${DEVICE_RUN_TINY:-0}
CONFIG=configs/mccnn.yaml
LOG=$OUT/device_run.log
WORK=$(mktemp -d /tmp/device_run.XXXXXX)
SITE=${SITE:-$WORK/site}
RUN=$WORK/mccnn
mkdir -p "$OUT"

log() { echo "[device_run +$(($(date +%s) - T0))s] $*" | tee -a "$LOG"; }
die() { log "FAILED: $1"; exit "${2:-1}"; }

log "start $(date -u '+%F %T') UTC in $PWD; budget ${BUDGET_S}s; tiny=$TINY"
[ -f "$PAYLOAD/MANIFEST.json" ] || die "no $PAYLOAD/MANIFEST.json: run scripts/prepare_device_run.py here and carry $PAYLOAD" 2
{ cat "$PAYLOAD/MANIFEST.json"; echo; command -v nvidia-smi >/dev/null && nvidia-smi; } >>"$LOG" 2>&1

# (1) The carried wheels. --python-version: they are built for the GPU machine's CPython 3.12;
# a rehearsal under another Python installs the same files.
log "installing $(ls "$PAYLOAD"/wheels/*.whl | wc -l) wheels into $SITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" --python-version 3.12 --only-binary=:all: "$PAYLOAD"/wheels/*.whl >>"$LOG" 2>&1 \
    || die "pip install of the wheels (see $LOG)" 3
if [ "$TINY" = 1 ] && ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    for whl in "$PAYLOAD"/wheels/*.whl; do  # compiled for CPython 3.12: cannot load here
        case $whl in *-none-any.whl) continue ;; esac
        pkg=$(basename "$whl" | cut -d- -f1)
        rm -rf "${SITE:?}/$pkg" "$SITE/$pkg"-*.dist-info
        log "rehearsal under $("$PY" -V 2>&1): its own $pkg stands in for $(basename "$whl")"
    done
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg

# (2) Fail in seconds, not after minutes of device time.
"$PY" - >>"$LOG" 2>&1 <<EOF || die "import check (see $LOG)" 4
import sys, torch, torchvision, cv2, detectron2, pycocotools.mask, fvcore, thyroid_det
print("python", sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__,
      "detectron2", detectron2.__version__, "from", detectron2.__file__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
assert $TINY or torch.cuda.is_available(), "torch sees no GPU"
EOF
log "imports ok: $(grep -E '^(python|cuda) ' "$LOG" | tr '\n' ' ')"

# (3) The data, registered from the carried COCO files (names as in the README's GPU section).
DATA=$PAYLOAD/data
TRAIN_JSON=$DATA/tn5000_train.json VAL_JSON=$DATA/tn5000_val.json
if [ "$TINY" = 1 ]; then  # the first few images of each split, same files
    "$PY" - "$DATA" "$WORK" <<'EOF' || die "tiny subsets" 5
import json, sys
data, work = sys.argv[1:]
for split, n in (("train", 8), ("val", 4)):
    coco = json.load(open(f"{data}/tn5000_{split}.json"))
    coco["images"] = coco["images"][:n]
    ids = {im["id"] for im in coco["images"]}
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in ids]
    json.dump(coco, open(f"{work}/tn5000_{split}.json", "w"))
EOF
    TRAIN_JSON=$WORK/tn5000_train.json VAL_JSON=$WORK/tn5000_val.json
fi
OPTS=(
    DATASETS.COCO_REGISTER "[['tn5000w_train','$TRAIN_JSON','$DATA/train'],['tn5000w_val','$VAL_JSON','$DATA/val']]"
    DATASETS.TRAIN "('tn5000w_train',)" DATASETS.TEST "('tn5000w_val',)"
    DATALOADER.NUM_WORKERS "$NUM_WORKERS" OUTPUT_DIR "$RUN"
)
if [ "$TINY" = 1 ]; then  # tests/conftest.py's TINY_MODEL sizes, and a 2 + 2 iteration cascade
    OPTS+=(MODEL.DEVICE cpu SOLVER.AMP.ENABLED False MODEL.VGG.WIDTH_MULT 0.0625
        INPUT.FIXED_SIZE "(128, 128)" INPUT.MAX_SIZE_TEST 128 MODEL.REFINER.WIDTH_MULT 0.125
        MODEL.REFINER.FC_DIM 16 MODEL.REFINER.INPUT_SIZE 64 TEST.NODULE_EVAL.BOOTSTRAP 20
        TEST.DETECTIONS_PER_IMAGE 10 SOLVER.IMS_PER_BATCH 2 SOLVER.MAX_ITER 4
        MODEL.MCCNN.DETECTOR_ITERS 2 SOLVER.WARMUP_ITERS 1 TEST.EVAL_PERIOD 2
        SOLVER.CHECKPOINT_PERIOD 2 DATALOADER.NUM_WORKERS 1)
fi
# shellcheck disable=SC2206  # EXTRA_OPTS is split into KEY VALUE words on purpose
OPTS+=(${EXTRA_OPTS:-})

# (4) Training, with its periodic and final evaluations, inside the budget.
TRAIN_S=$((BUDGET_S - RESERVE_S - ($(date +%s) - T0)))
[ "$TRAIN_S" -gt 30 ] || die "only ${TRAIN_S}s left for training" 6
if [ "$TINY" != 1 ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw --format=csv -l 15 \
        >"$OUT/gpu.csv" 2>/dev/null &
    SMI=$!
fi
# On stdout (the device tool returns its tail): progress every 20 iterations, the stage change,
# each evaluation's COCO line; everything is in device_run.log.
NUM='(nan|[0-9.]+)'
SHOW="eta:|enters stage|Overall training speed|copypaste: (Task: bbox|AP,AP50|$NUM(,$NUM){5}$)|Traceback|[A-Za-z]+Error"
log "training $CONFIG for at most ${TRAIN_S}s: ${OPTS[*]}"
timeout -s INT -k 30 "$TRAIN_S" "$PY" tools/train_net.py --config-file "$CONFIG" "${OPTS[@]}" 2>&1 \
    | tee -a "$LOG" | grep --line-buffered -E "$SHOW"
TRAIN_RC=${PIPESTATUS[0]}
[ -n "${SMI:-}" ] && kill "$SMI" 2>/dev/null
case $TRAIN_RC in
    0) log "training finished" ;;
    124 | 137) log "training CUT by its ${TRAIN_S}s time box (rc $TRAIN_RC): the last periodic evaluation stands" ;;
    *) log "training FAILED (rc $TRAIN_RC); the log's last lines:"; tail -n 25 "$LOG" ;;
esac

# (5) What comes back.
LABEL="mccnn.yaml, $(sed -n 's/^cuda True //p' "$LOG" | head -1)"
[ "$TINY" = 1 ] && LABEL="mccnn.yaml, CPU rehearsal"
if [ -f "$RUN/metrics.json" ]; then
    "$PY" scripts/summarize_run.py "$RUN" --output "$OUT/summary.json" 2>&1 | tee -a "$LOG"
    cp "$RUN/metrics.json" "$OUT/"
    "$PY" tools/plot_curves.py "$RUN" --labels "$LABEL" --output "$OUT/learning_curves.png" >>"$LOG" 2>&1 \
        || log "plot_curves failed (see log)"
else
    log "no metrics.json: training wrote nothing"
fi
[ -f "$RUN/config.yaml" ] && cp "$RUN/config.yaml" "$OUT/"
NODULES=$(ls -t "$RUN"/inference/*/nodule_metrics.json 2>/dev/null | head -1)
[ -n "$NODULES" ] && cp "$NODULES" "$OUT/nodule_metrics.json"
if [ -f "$RUN/model_final.pth" ]; then
    SIZE=$(stat -c %s "$RUN/model_final.pth")
    if [ "$SIZE" -lt $((16 * 1024 * 1024)) ]; then
        cp "$RUN/model_final.pth" "$OUT/"
    else
        log "model_final.pth is $((SIZE / 1024 / 1024)) MiB: over the 16 MiB a returned file may have, left there"
    fi
fi
log "done; back in \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
[ "$TRAIN_RC" = 0 ] || [ "$TRAIN_RC" = 124 ] || [ "$TRAIN_RC" = 137 ] || exit "$TRAIN_RC"
