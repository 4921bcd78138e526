#!/usr/bin/env bash
# The GPU check, one command for anyone with a CUDA GPU (`make gpu-check`, about 8 minutes on an H200):
#   1. benchmarks/pipeline_throughput.py --profile paper: training input, the train stage against the
#      model-only step, the evaluate stage against reconstructions alone;
#   2. the CUDA-only tests (every test marked `cuda`);
#   3. benchmarks/paper_profile.py (fp32, fp16, bf16 training and evaluation; PAPER_PROFILE_VARIANTS);
#   4. benchmarks/checkpoint_cost.py (the original's best-checkpoint writes against resume.py's, in epochs);
#   5. the paper-profile smoke test in full mode (every UNet pass real);
# then benchmarks/gpu_report.py turns the reports into the README's GPU block (the card, the figures and the
# paper run's hours on one GPU and on eight, computed from the measured rates).
# Every step runs even if one before it failed; each writes its log under the report folder, and the exit
# status says whether all passed. PYTHON picks the interpreter (default: the repository's .venv, else
# python3); GPU_CHECK_DIR the report folder (default reports/gpu); GPU_CHECK_SKIP steps to leave out
# (e.g. "paper_smoke").
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DIR=${GPU_CHECK_DIR:-reports/gpu}
SKIP=${GPU_CHECK_SKIP:-}
export PYTHONPATH="src:benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 DVC_NO_ANALYTICS=1
mkdir -p "$DIR"
: > "$DIR/summary.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu-check: no CUDA device visible to $PY" | tee -a "$DIR/summary.txt"
  exit 2
fi
"$PY" -c "import torch; print(torch.cuda.get_device_name(0), '|', torch.__version__, '|', torch.version.cuda)" \
  > "$DIR/device.txt"
status=0
step() {
  local name=$1 started rc
  shift
  case " $SKIP " in *" $name "*) echo "$name: skipped" | tee -a "$DIR/summary.txt"; return;; esac
  started=$(date +%s)
  "$@" > "$DIR/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc in $(( $(date +%s) - started )) s" | tee -a "$DIR/summary.txt"
  tail -n 3 "$DIR/$name.log" | sed 's/^/    /'
  [ "$rc" -eq 0 ] || status=1
}
# train.compile off here: compiling the paper networks for the model-only step and again in the stage (train,
# validation, the last smaller batch) took longer than this check's budget on an H200; paper_profile.py's
# fp16+compile variant measures what compiling gains
step pipeline_throughput "$PY" benchmarks/pipeline_throughput.py --profile paper --parts input,eval,train \
  --report "$DIR" train.compile=false
# the files that hold a test marked `cuda` (collecting only these keeps the step short)
# shellcheck disable=SC2046  # the file names are words
step cuda_tests "$PY" -m pytest -q -p no:cacheprovider -m cuda $(grep -l "pytest.mark.cuda$" tests/test_*.py)
# shellcheck disable=SC2086  # the variants are words
step paper_profile "$PY" benchmarks/paper_profile.py --variants ${PAPER_PROFILE_VARIANTS:-fp32 fp16 bf16} --eval-scans 2 \
  --report "$DIR"
step checkpoint_cost "$PY" benchmarks/checkpoint_cost.py --report "$DIR"
step paper_smoke "$PY" -m pytest -q -p no:cacheprovider tests/test_paper_profile.py
step gpu_report "$PY" benchmarks/gpu_report.py --dir "$DIR"
exit $status
