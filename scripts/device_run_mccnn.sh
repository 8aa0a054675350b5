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
# (3b) calibrate (CALIBRATE=1, the default on a GPU): 80 iterations and one evaluation, which
# fail fast if anything breaks here and time both stages, so that scripts/plan_device_run.py
# sizes the longest schedule that fits (CALIBRATE=0, or a failed plan: SCHEDULE instead);
# (4) train with tools/train_net.py under `timeout -s INT`, so that the script as a whole ends
# by BUDGET_S: an interrupted run still leaves metrics.json with every evaluation made so far
# (TEST.EVAL_PERIOD); (4b) tools/benchmark.py: Ec's bare training step and the cascade's cost
# over Ec on the GPU; (5) summary table, learning curves, and the files below into $OUT; (6) with
# the time left, the final model evaluated again with test-time flips (in device_run.log).
#
# Brought back ($OUT, the 8 files a call may return): device_run.log (this script's output,
# calibration and training logs included), summary.json (every evaluation's headline metrics;
# completed or cut), metrics.json, nodule_metrics.json (the last evaluation's clinical report),
# learning_curves.png, config.yaml, gpu.csv (utilisation and memory every 15 s) and
# benchmark_gpu.json; with TRAIN=0, device_run.log, benchmark_gpu.json and
# benchmark_gpu_<config>_<mode>.json (4 files). The trained model stays there.
#
# Environment (defaults are the GPU run's):
#   BUDGET_S=575       seconds, from start to the end of copying (the device call's timeout_s
#                      of 600 held it); training gets what is left after the install, checks
#                      and calibration, less RESERVE_S=105 for the benchmark, curves and copies
#   CALIBRATE=1        calibrate (80 iterations and an evaluation: an estimated minute at
#                      the H200's speeds, cuDNN's autotuning off) and plan the schedule from what
#                      it measures. The
#                      default since 2026-12-06: Ec's step then stopped issuing its work image
#                      by image, so its speed on a GPU is no longer the one SCHEDULE was sized
#                      at. 0: train SCHEDULE without calibrating (the rehearsal's default)
#   SCHEDULE="..."     without calibration, or when planning fails, the schedule trained: by
#                      default the one that fits the budget at the speeds measured on an H200
#                      on 2026-11-30 (Ec 0.225 s per iteration at batch 32, refiner 0.29 s, 25 s
#                      an evaluation, README "TN5000 on one GPU"); SCHEDULE="" trains the
#                      config's own
#   PLANNER=...        the planning script (scripts/plan_device_run.py); a rehearsal with a
#                      missing one checks the fallback to SCHEDULE
#   BENCH=1            0: no benchmark
#   FLIP_EVAL=1        0: no evaluation with test-time flips at the end
#   TRAIN=1            0: benchmarks only (more of them, see bench below; ~4-10 min; BENCH is
#                      ignored), for a second call:
#                      run(command="TRAIN=0 bash scripts/device_run_mccnn.sh", ...)
#   NUM_WORKERS=12     data-loader workers (16 cores: 12 mappers, the rest for the main process)
#   EXTRA_OPTS="..."   more KEY VALUE config overrides, appended last (after the planned ones)
#   PYTHON=python3     the interpreter (the machine's own holds torch)
#   DEVICE_RUN_TINY=1  a rehearsal on a CPU: a few images, a tiny model (see below)
set -uo pipefail

cd "$(dirname "$0")/.."
T0=$(date +%s)
: "${OUT:?set OUT to the folder that comes back}"
PY=${PYTHON:-python3}
PAYLOAD=${PAYLOAD:-device_payload}
BUDGET_S=${BUDGET_S:-575}
RESERVE_S=${RESERVE_S:-105}
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
EXTRA=(${EXTRA_OPTS:-})

NUM='(nan|[0-9.]+)'

# tools/benchmark.py on this GPU, random weights at $CONFIG's input size and width (with
# EXTRA_OPTS applied): Ec's training step alone at batch 32 (forward, backward, torchvision's SGD step; bf16
# autocast), to compare with the trainer's seconds per iteration (loader, hooks, clipping, AdamW,
# EMA on top), and the cascade's cost over Ec with exactly k
# detections reaching the refiner. With TRAIN=0 also each cascade config at its own size, its
# refiner plain and under torch.compile's CUDA graphs (benchmark_gpu_<config>_<mode>.json).
bench() {
    # Ec is timed on Base-SSD.yaml (an SSD, not the cascade) at $CONFIG's width and input size,
    # read from it with EXTRA_OPTS applied, so that they match the job's (and its log line).
    local width size
    read -r width size < <("$PY" -c 'import sys; from types import SimpleNamespace
from thyroid_det.engine.defaults import load_cfg
cfg = load_cfg(SimpleNamespace(config_file=sys.argv[1], opts=sys.argv[2:]))
print(cfg.MODEL.VGG.WIDTH_MULT, cfg.INPUT.FIXED_SIZE[0])' "$CONFIG" "${EXTRA[@]}" 2>>"$LOG")
    [ -n "$size" ] || { log "benchmark: cannot read $CONFIG's width and size (see log)"; return 0; }
    log "benchmark: Ec's training step (width $width, $size px), the cascade over Ec"
    timeout -s INT -k 10 "${BENCH_S:-60}" "$PY" tools/benchmark.py --device cuda --amp \
        --only ec cascade --no-flops --size "$size" --train-batch 32 \
        --config-file configs/Base-SSD.yaml --warmup 2 --repeats 10 \
        --output "$OUT/benchmark_gpu.json" --opts MODEL.VGG.WIDTH_MULT "$width" "${EXTRA[@]}" \
        >>"$LOG" 2>&1 || log "benchmark failed or was cut (see log)"
    [ "${TRAIN:-1}" = 0 ] || return 0
    local spec name size mode
    for spec in mccnn:320 mccnn_cpu:256; do
        name=${spec%:*} size=${spec#*:}
        for mode in plain reduce-overhead; do
            log "benchmark: $name.yaml's cascade over its Ec at $size px, refiner $mode"
            # compiling two cascades (1 and 10 detections) may take a minute on its own
            timeout -s INT -k 10 "${BENCH_COMPILE_S:-150}" "$PY" tools/benchmark.py --device cuda \
                --only cascade --no-train --size "$size" --detections 1 10 --warmup 3 --repeats 20 \
                --cascade-config-file "configs/$name.yaml" \
                $([ "$mode" = plain ] || echo --compile-refiner "$mode") \
                --output "$OUT/benchmark_gpu_${name}_$mode.json" >>"$LOG" 2>&1 \
                || log "benchmark failed or was cut (see log)"
        done
    done
}
if [ "${TRAIN:-1}" = 0 ]; then
    [ "$TINY" = 1 ] && die "TRAIN=0 benchmarks a GPU; the rehearsal has none" 9
    bench
    log "done (TRAIN=0: benchmarks only); back in \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
    exit 0
fi

# (3b) Calibration: the config for 80 iterations (60 of Ec, 20 of the refiner) and its final
# evaluation on the whole validation split. It fails fast if anything breaks on this machine
# (CUDA, AMP, the evaluators), and times a step of each stage, the start-up and one evaluation,
# from which scripts/plan_device_run.py sizes the longest schedule that fits the budget.
# CALIBRATE=0 (the rehearsal's default) skips it and trains SCHEDULE.
# shellcheck disable=SC2206  # KEY VALUE words
PLAN=(${SCHEDULE-SOLVER.MAX_ITER 1480 MODEL.MCCNN.DETECTOR_ITERS 1320 TEST.EVAL_PERIOD 660 SOLVER.CHECKPOINT_PERIOD 660})
[ "$TINY" = 1 ] && PLAN=(${SCHEDULE-})  # the rehearsal keeps its 4 iterations
MIN_ITER=200
[ "$TINY" = 1 ] && MIN_ITER=40
CALIBRATE=${CALIBRATE:-$([ "$TINY" = 1 ] && echo 0 || echo 1)}
if [ "$CALIBRATE" = 1 ]; then
    SMOKE=$WORK/calibration
    log "calibration: 80 iterations and one evaluation"
    LAUNCHED=$(date +%s)
    timeout -s INT -k 20 "${CALIBRATE_S:-200}" "$PY" tools/train_net.py --config-file "$CONFIG" \
        "${OPTS[@]}" SOLVER.MAX_ITER 80 MODEL.MCCNN.DETECTOR_ITERS 60 SOLVER.WARMUP_ITERS 20 \
        TEST.EVAL_PERIOD 0 SOLVER.CHECKPOINT_PERIOD 100000 OUTPUT_DIR "$SMOKE" "${EXTRA[@]}" \
        >"$WORK/calibration.log" 2>&1
    SMOKE_RC=$?
    cat "$WORK/calibration.log" >>"$LOG"
    if [ "$SMOKE_RC" != 0 ]; then
        log "calibration FAILED (rc $SMOKE_RC); its last lines:"
        grep -v Warning "$WORK/calibration.log" | tail -n 30
        exit 7
    fi
    grep -E "copypaste: $NUM(,$NUM){5}$" "$WORK/calibration.log" | tail -n 2
    PLAN_S=$((BUDGET_S - RESERVE_S - ($(date +%s) - T0)))
    # 90% of what is left: an evaluation slower than the calibration's must not cut the run.
    FIXED=("${PLAN[@]}")
    if read -r -a PLAN < <("$PY" "${PLANNER:-scripts/plan_device_run.py}" "$SMOKE" "$WORK/calibration.log" \
        --seconds $((PLAN_S * 9 / 10)) --smoke-detector-iters 60 --min-iter "$MIN_ITER" \
        --launched "$LAUNCHED" --output "$WORK/plan.json" 2>>"$LOG") && [ "${#PLAN[@]}" -gt 0 ]; then
        log "calibration: $(tr -d '\n ' <"$WORK/plan.json")"
    else
        # The calibration trained and evaluated, so training works here: train SCHEDULE rather
        # than nothing; the time box may cut it (its periodic evaluations stand).
        PLAN=("${FIXED[@]}")
        log "planning the schedule FAILED (see $LOG): training SCHEDULE instead: ${PLAN[*]}"
    fi
fi
OPTS+=("${PLAN[@]}" "${EXTRA[@]}")

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

# (4b) The benchmark (bench, defined before (3b)).
[ "${BENCH:-1}" = 1 ] && [ "$TINY" != 1 ] && bench

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

# (6) With what is left of the budget: the final model evaluated again with the test-time flips
# (MODEL.SSD.TEST_FLIP, MODEL.REFINER.TEST_FLIP), its results in device_run.log only. Last, so
# that a slow evaluation cuts nothing else.
LEFT_S=$((BUDGET_S - ($(date +%s) - T0) - 10))
if [ "${FLIP_EVAL:-1}" = 1 ] && [ -f "$RUN/model_final.pth" ] && [ "$LEFT_S" -gt 20 ]; then
    log "evaluating model_final.pth with test-time flips, for at most ${LEFT_S}s"
    timeout -s INT -k 5 "$LEFT_S" "$PY" tools/evaluate.py --config-file "$CONFIG" \
        --dataset tn5000w_val --weights "$RUN/model_final.pth" --output "$WORK/flip_eval" \
        "${OPTS[@]}" MODEL.SSD.TEST_FLIP True MODEL.REFINER.TEST_FLIP True 2>&1 | tee -a "$LOG" \
        | grep -E "^\| (bbox(_agnostic)?\.AP50|nodule\.(recall50|auc)|seconds_per_image) " \
        || log "the flip evaluation failed or was cut (see log)"
fi
log "done; back in \$OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
[ "$TRAIN_RC" = 0 ] || [ "$TRAIN_RC" = 124 ] || [ "$TRAIN_RC" = 137 ] || exit "$TRAIN_RC"
