#!/usr/bin/env bash
# One command for a GPU session: build against the preinstalled torch, run the whole test
# suite and, at the same time, compute-sanitizer (memcheck, racecheck, initcheck, synccheck)
# over the CUDA op tests, then the benches (alone on the GPU); each step in its own log under
# OUTDIR, under a time budget, and the whole run under --deadline where given. A failing step
# does not stop the next ones (except that a failed build skips what needs it); the exit status
# is non-zero if any step failed, timed out or found no time left; a summary table is printed
# last. See bench/README.md, "On a GPU machine: one command".
#
#   bash bench/gpu_check.sh OUTDIR [--quick] [--wheels DIR] [--only STEP,...] [--budget STEP=S]...
#                                  [--deadline S] [--serial] [--archive FILE.tar.gz] [--dry-run]
#
# Environment: PYTHON (default: the first of python3, python that imports torch);
# COMPUTE_SANITIZER and NSIGHT_COMPUTE (ncu) (default: on PATH, else $CUDA_HOME/bin, /usr/local/cuda/bin);
# GPU_CHECK_SANITIZER_KERNELS (mangled-name substring of the kernels racecheck and synccheck
# check; default "indivgrad", our namespace; empty: every kernel; memcheck and initcheck check
# all); GPU_CHECK_TEST_WORKERS (pytest-xdist workers for the tests step where xdist is
# installed, default 6); GPU_CHECK_COMMIT (the commit env.txt and the benches' rows record;
# set it: the device's copy of .git can be older than the tree); GPU_CHECK_MIN_LEFT (with
# --deadline, the fewest seconds a step starts with, default 30).
set -euo pipefail

PROG=gpu_check.sh
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

STEPS=(build env wheels tests sanitizer-memcheck sanitizer-racecheck sanitizer-initcheck sanitizer-synccheck
       kernels profile run attribution dp dp-step)
SANITIZER_STEPS=" sanitizer-memcheck sanitizer-racecheck sanitizer-initcheck sanitizer-synccheck "
NEEDS_BUILD=" tests$SANITIZER_STEPS""kernels profile run attribution dp dp-step "  # skipped when the build failed

CONCURRENT_STEPS=" tests$SANITIZER_STEPS"  # run at the same time unless --serial

# Time budgets in seconds, enforced with `timeout`. The tests and the four sanitizer steps run
# at the same time (one GPU, 16 cores; --serial: one after another), so the worst case is
#   full:  build 80 + env 15 + wheels 10 + max(tests, sanitizers) 210 + kernels 40 + profile 45 + run 200
#          + attribution 90 + dp 120 + dp-step 120 = 930 s
#   quick: build 80 + env 15 + wheels 10 + max(tests, sanitizers)  60 + kernels 25 + profile 60 + run 30
#          + attribution 45 + dp 45 + dp-step 45 = 415 s
# A device command may run 600 s: with --deadline 570 the full run ends in time, and the steps
# the deadline left no time for are named, with the command that runs them (a second call).
# Measured on the lent H200 (2026-11-28, e14e716, the steps of the group at the same time): build
# 53 s, env 4, wheels 1, racecheck 122, synccheck 35, kernels 29 (both layouts), profile 16
# (ncu alone, c8943bd); tests, memcheck and initcheck ran past 180, 150 and 180 s (97%, 74% and
# 90% done), run.py past 100 s (the seed MLPs and the transformers done, about 40 s left by its
# pace). The kernel-emulation tests, one worker's ~135 s of that run, now build and run their
# binaries at once. attribution and dp have not run on a GPU: their budgets are guesses from
# CPU runs (attribution_digits.py's default sizes, dp_sgd_digits.py's two models). dp-step
# (bench/dp_step.py, BERT-base and GPT-2 small, float32 and bf16) has not run on a GPU either: about
# 10 s of imports and model building, then per setup and precision a check, the first calls and
# at least 5 interleaved rounds of three steps (GPT-2 small's: ~0.1 s non-private, Opacus's
# ghost clipping a few times that, by the FLOPs): 120 s leaves about twice that.
declare -A BUDGET_FULL=([build]=80 [env]=15 [wheels]=10 [tests]=210 [sanitizer-memcheck]=210
                        [sanitizer-racecheck]=180 [sanitizer-initcheck]=210 [sanitizer-synccheck]=150
                        [kernels]=40 [profile]=45 [run]=200 [attribution]=90 [dp]=120 [dp-step]=120)
declare -A BUDGET_QUICK=([build]=80 [env]=15 [wheels]=10 [tests]=60 [sanitizer-memcheck]=60
                         [sanitizer-racecheck]=60 [sanitizer-initcheck]=60 [sanitizer-synccheck]=60
                         [kernels]=25 [profile]=60 [run]=30 [attribution]=45 [dp]=45 [dp-step]=45)

# pytest selections: the GPU tests are those with the `cuda` marker (-m cuda; tests/conftest.py:
# a test that needs a GPU carries it, and so does the "cuda" param of the device fixture). The
# sanitizers leave out the >2^31-element tests (names containing 2_31, e.g. over_2_31).
SAN_K_FULL="not 2_31"
SAN_K_QUICK_MEMCHECK="$SAN_K_FULL and (every_element_written or guards_untouched or misaligned)"
SAN_K_QUICK_FEW="$SAN_K_FULL and every_element_written and (dtype0 or dtype3)"

USAGE="usage: bash bench/gpu_check.sh OUTDIR [--quick] [--wheels DIR] [--only STEP,...] [--budget STEP=S]... [--deadline S] [--serial] [--archive FILE] [--dry-run]"

usage() {
    cat <<EOF
$USAGE

  OUTDIR           where the logs, env.txt, tests-junit.xml, summary.txt, steps.tsv and results/ go
  --quick          CUDA tests only, sanitizer subsets, benches with --quick: ${BUDGET_QUICK[build]} s build + about 5 min
  --wheels DIR     install DIR/*.whl (pip --no-index --no-deps), e.g. Opacus, BackPACK, unfoldNd, dattri, traker
  --only STEPS     run only these steps (comma-separated); the others are reported as skipped
  --budget STEP=S  give STEP S seconds instead of its default (repeatable)
  --deadline S     end within S seconds: a step's budget is cut to the time left, a step with
                   under \$GPU_CHECK_MIN_LEFT (30) s left does not start (named at the end, with
                   the command that runs the steps left), e.g. 570 for a 600 s device command
  --serial         run the tests and the four sanitizer steps one after another, not at the same time
  --archive FILE   keep FILE (.tar.gz, outside OUTDIR) holding OUTDIR, refreshed after every step
  --dry-run        print the plan (each step's commands and budget) and exit 0; needs no GPU
  -h, --help       this text

steps: ${STEPS[*]}
EOF
}

die() {
    echo "$PROG: error: $*" >&2
    echo "$USAGE" >&2
    exit 2
}

need_value() {  # need_value OPTION NEXT_ARG_COUNT NEXT_ARG WHAT
    if (($2 < 2)) || [[ $3 == --* ]]; then die "$1 needs $4"; fi
}

abspath() {
    case $1 in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$PWD/$1" ;;
    esac
}

is_step() { [[ " ${STEPS[*]} " == *" $1 "* ]]; }

# ---------------------------------------------------------------- arguments
OUTDIR="" QUICK=0 DRY=0 SERIAL=0 WHEELS="" ONLY="" ARCHIVE="" DEADLINE=""
declare -A BUDGET_SET=()
set_budget() {
    local step=${1%%=*} secs=${1#*=}
    if [[ $1 != *=* ]] || ! is_step "$step"; then
        die "--budget wants STEP=SECONDS with a step of: ${STEPS[*]} (got '$1')"
    fi
    [[ $secs =~ ^[1-9][0-9]*$ ]] || die "--budget $step: seconds must be a positive integer (got '$secs')"
    BUDGET_SET[$step]=$secs
}
while (($#)); do
    case $1 in
        -h | --help) usage; exit 0 ;;
        --quick) QUICK=1 ;;
        --dry-run) DRY=1 ;;
        --serial) SERIAL=1 ;;
        --wheels) need_value "$1" $# "${2-}" "a directory of .whl files"; WHEELS=$2; shift ;;
        --wheels=*) WHEELS=${1#*=} ;;
        --only) need_value "$1" $# "${2-}" "a comma-separated list of steps (${STEPS[*]})"; ONLY=$2; shift ;;
        --only=*) ONLY=${1#*=} ;;
        --budget) need_value "$1" $# "${2-}" "STEP=SECONDS"; set_budget "$2"; shift ;;
        --budget=*) set_budget "${1#*=}" ;;
        --deadline) need_value "$1" $# "${2-}" "SECONDS"; DEADLINE=$2; shift ;;
        --deadline=*) DEADLINE=${1#*=} ;;
        --archive) need_value "$1" $# "${2-}" "a file name (.tar.gz)"; ARCHIVE=$2; shift ;;
        --archive=*) ARCHIVE=${1#*=} ;;
        -*) die "unknown option '$1'" ;;
        *)
            [[ -z $OUTDIR ]] || die "unexpected argument '$1' (OUTDIR is already '$OUTDIR')"
            OUTDIR=$1 ;;
    esac
    shift
done
[[ -n $OUTDIR ]] || die "missing OUTDIR, the directory for logs and results"
if [[ -n $DEADLINE ]]; then
    [[ $DEADLINE =~ ^[1-9][0-9]*$ ]] || die "--deadline: seconds must be a positive integer (got '$DEADLINE')"
fi
MIN_LEFT=${GPU_CHECK_MIN_LEFT:-30}
[[ $MIN_LEFT =~ ^[0-9]+$ ]] || die "GPU_CHECK_MIN_LEFT: seconds must be a non-negative integer (got '$MIN_LEFT')"
[[ ! -e $OUTDIR || -d $OUTDIR ]] || die "OUTDIR '$OUTDIR' exists and is not a directory"
OUTDIR=$(abspath "$OUTDIR")
if [[ -n $WHEELS ]]; then
    [[ -d $WHEELS ]] || die "--wheels: no such directory: '$WHEELS'"
    WHEELS=$(cd "$WHEELS" && pwd)
    compgen -G "$WHEELS/*.whl" >/dev/null || die "--wheels: no .whl files in '$WHEELS'"
fi
declare -A SELECTED=()
if [[ -n $ONLY ]]; then
    IFS=, read -r -a only_list <<<"$ONLY"
    for s in "${only_list[@]}"; do
        is_step "$s" || die "--only: unknown step '$s' (steps: ${STEPS[*]})"
        SELECTED[$s]=1
    done
else
    for s in "${STEPS[@]}"; do SELECTED[$s]=1; done
fi
if [[ -n $ARCHIVE ]]; then
    ARCHIVE=$(abspath "$ARCHIVE")
    [[ $ARCHIVE != "$OUTDIR"/* ]] || die "--archive must be outside OUTDIR"
    [[ -d $(dirname "$ARCHIVE") ]] || die "--archive: no such directory: '$(dirname "$ARCHIVE")'"
fi
if ((QUICK)); then MODE=quick; else MODE=full; fi

pick_python() {
    if [[ -n ${PYTHON:-} ]]; then printf '%s\n' "$PYTHON"; return 0; fi
    local c
    for c in python3 python; do  # the one that holds torch
        if command -v "$c" >/dev/null && "$c" -c "import torch" >/dev/null 2>&1; then command -v "$c"; return 0; fi
    done
    for c in python3 python; do
        if command -v "$c" >/dev/null; then command -v "$c"; return 0; fi
    done
    return 1
}
PY=$(pick_python) || die "no python3 or python on PATH (set PYTHON)"
if [[ $PY == */* ]]; then PY=$(abspath "$PY"); fi  # the steps run in the repository's root

find_sanitizer() {
    local c
    for c in "${COMPUTE_SANITIZER:-}" "$(command -v compute-sanitizer || true)" \
             ${CUDA_HOME:+"$CUDA_HOME/bin/compute-sanitizer"} /usr/local/cuda/bin/compute-sanitizer \
             /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
        if [[ -n $c && -x $c ]]; then printf '%s\n' "$c"; return 0; fi
    done
    return 1
}
SAN=$(find_sanitizer) || SAN=""
find_ncu() {
    local c
    for c in "${NSIGHT_COMPUTE:-}" "$(command -v ncu || true)" ${CUDA_HOME:+"$CUDA_HOME/bin/ncu"} /usr/local/cuda/bin/ncu; do
        if [[ -n $c && -x $c ]]; then printf '%s\n' "$c"; return 0; fi
    done
    return 1
}
NCU=$(find_ncu) || NCU=""
KERNEL_FILTER=${GPU_CHECK_SANITIZER_KERNELS-indivgrad}
TEST_WORKERS=${GPU_CHECK_TEST_WORKERS:-6}

budget_of() {
    if [[ -n ${BUDGET_SET[$1]:-} ]]; then echo "${BUDGET_SET[$1]}"
    elif ((QUICK)); then echo "${BUDGET_QUICK[$1]}"
    else echo "${BUDGET_FULL[$1]}"; fi
}
runs() { [[ -n ${SELECTED[$1]:-} ]] && ! [[ $1 == wheels && -z $WHEELS ]]; }
parallel() { ((!SERIAL)) && [[ $CONCURRENT_STEPS == *" $1 "* ]]; }

# ---------------------------------------------------------------- the commands of each step
q() {  # quote one argument for display: plain words as they are, the rest in single quotes
    if [[ $1 =~ ^[][A-Za-z0-9_./:=,+@%-]+$ ]]; then printf '%s' "$1"
    else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
x() {  # print a command (into the step's log), then run it; in a dry run only print it
    local a line="\$"
    for a in "$@"; do line+=" $(q "$a")"; done
    if ((DRY)); then printf '      %s\n' "$line"; return 0; fi
    printf '%s\n' "$line"
    "$@"
}
say() { if ((DRY)); then printf '      # %s\n' "$*"; else printf '# %s\n' "$*"; fi; }

step_build() {
    say "a C++ compiler that links libstdc++ dynamically (the H200 image's default does not, and C++ errors crashed Python)"
    x "$PY" bench/gpu_check.py pick-compiler "$OUTDIR/compiler.env"
    local compiler=()
    if [[ -s $OUTDIR/compiler.env ]]; then mapfile -t compiler <"$OUTDIR/compiler.env"; fi
    say "editable build against the installed torch; INDIVGRAD_CUDA=1 makes a build without CUDA kernels fail"
    x env INDIVGRAD_CUDA=1 ${compiler[@]+"${compiler[@]}"} "$PY" -m pip install --no-index --no-build-isolation --no-deps -v -e .
    x "$PY" bench/gpu_check.py verify-build
}

step_env() {
    say "environment facts, into $OUTDIR/env.txt"
    if ((DRY)); then
        x nvidia-smi -L
        x nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
        x nvcc --version
        x "${SAN:-compute-sanitizer}" --version
        x git -C "$ROOT" rev-parse HEAD
        x "$PY" bench/gpu_check.py env
        return 0
    fi
    {
        echo "## gpu_check.sh $MODE mode, $(date -u '+%Y-%m-%dT%H:%M:%SZ'), $(uname -srm)"
        echo "## commit"
        # GPU_CHECK_COMMIT first: the device's copy of .git can be older than the tree it came with
        if [[ -n ${GPU_CHECK_COMMIT:-} ]]; then echo "$GPU_CHECK_COMMIT (GPU_CHECK_COMMIT)"
        else
            { git -C "$ROOT" rev-parse HEAD && git -C "$ROOT" status --short --untracked-files=no; } 2>/dev/null \
                || echo "unknown (no git repository here; set GPU_CHECK_COMMIT)"
        fi
        echo "## nvidia-smi -L"; nvidia-smi -L 2>&1 || true
        echo "## nvidia-smi --query-gpu"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
        echo "## nvcc --version"; { nvcc --version 2>&1 || true; } | tail -n 2
        echo "## compute-sanitizer --version"; { "${SAN:-compute-sanitizer}" --version 2>&1 || true; } | tail -n 1
        echo "## python: $PY"; "$PY" bench/gpu_check.py env 2>&1 || true
    } >"$OUTDIR/env.txt"
    cat "$OUTDIR/env.txt"
}

step_wheels() {
    local whl=("$WHEELS"/*.whl)
    x "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir "${whl[@]}"
    x "$PY" bench/gpu_check.py wheels
}

step_tests() {
    # -v: one line per test as it ends, so a run stopped by its budget still names what failed
    local args=(-m pytest -v -p no:cacheprovider -rfEs --durations=15 --junitxml "$OUTDIR/tests-junit.xml")
    if ((QUICK)); then
        say "quick: the GPU tests only (-m cuda)"
        args+=(-m cuda)
    fi
    # pytest-xdist where installed (the lent H200 has it): each test file in one worker
    if "$PY" -c "import xdist" 2>/dev/null; then args+=(-n "$TEST_WORKERS" --dist loadfile); fi
    x "$PY" "${args[@]}" tests
}

sanitize() {  # sanitize TOOL
    local tool=$1 k files=(tests/test_ops.py) env_vars=(OMP_NUM_THREADS=4) opts
    if [[ -f $ROOT/tests/test_cuda_ops.py ]]; then files+=(tests/test_cuda_ops.py)
    else say "tests/test_cuda_ops.py is absent: tests/test_ops.py alone"; fi
    if ((!QUICK)); then k=$SAN_K_FULL
    elif [[ $tool == memcheck ]]; then k=$SAN_K_QUICK_MEMCHECK
    else k=$SAN_K_QUICK_FEW; fi
    if [[ -z $SAN ]]; then
        say "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin): set COMPUTE_SANITIZER"
        ((DRY)) || return 1
    fi
    opts=(--tool "$tool" --error-exitcode 1 --target-processes all --print-limit 20)
    # Racecheck and synccheck look inside one kernel, so they may skip torch's. Initcheck may
    # not: it learns which bytes are written from the kernels it instruments, and a filter
    # turns every tensor that torch's kernels wrote (randn, copies) into "uninitialized" reads.
    if [[ $tool == racecheck || $tool == synccheck ]] && [[ -n $KERNEL_FILTER ]]; then
        opts+=(--kernel-name "kns=$KERNEL_FILTER")
    fi
    # PyTorch's caching allocator would hide out-of-bounds and uninitialised accesses inside its blocks
    if [[ $tool == memcheck || $tool == initcheck ]]; then env_vars+=(PYTORCH_NO_CUDA_MEMORY_CACHING=1); fi
    x env "${env_vars[@]}" "${SAN:-compute-sanitizer}" "${opts[@]}" \
        "$PY" -m pytest -q -p no:cacheprovider -rfE --maxfail=5 "${files[@]}" -k "$k" -m cuda
}
step_sanitizer_memcheck() { sanitize memcheck; }
step_sanitizer_racecheck() { sanitize racecheck; }
step_sanitizer_initcheck() { sanitize initcheck; }
step_sanitizer_synccheck() { sanitize synccheck; }

load() {  # before a bench: the load and the busiest processes (the H200's third run had a slow host)
    say "load average, and the processes using the most CPU"
    x cat /proc/loadavg
    x ps -eo pcpu,etimes,args --sort=-pcpu --cols 160 | head -n 6 || true  # informational: never fails the step
}

step_kernels() {
    load
    local args=(bench/kernels.py --device cuda --layouts out_in in_out --results-dir "$OUTDIR/results" --quiet)
    if ((QUICK)); then args+=(--quick --no-compile); else args+=(--all); fi
    x "$PY" "${args[@]}"
}

# Where an engine call's time goes (bench/profile_engine.py: torch.profiler, the transformer setup
# whose hooks capture took 2x the summed step), then Nsight Compute over one launch of the kernel
# per path (bench/ncu_outer.py): DRAM throughput, shared-memory bank conflicts, issue-slot use and
# occupancy, as CSV, for bench/NOTES.md.
step_profile() {
    if ((QUICK)); then x "$PY" bench/profile_engine.py --device cuda --setup tfm:4,8,32,1 --calls 2
    else x "$PY" bench/profile_engine.py --device cuda; fi
    local args=(--csv --page details --kernel-name regex:outer_kernel --log-file "$OUTDIR/ncu.csv") sec
    for sec in SpeedOfLight MemoryWorkloadAnalysis MemoryWorkloadAnalysis_Tables SchedulerStats Occupancy LaunchStats; do
        args+=(--section "$sec")
    done
    if [[ -z $NCU ]]; then
        say "ncu not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin): set NSIGHT_COMPUTE"
        ((DRY)) || return 1
    fi
    x "${NCU:-ncu}" "${args[@]}" "$PY" bench/ncu_outer.py
}

step_run() {
    load
    local args=(bench/run.py --device cuda --results-dir "$OUTDIR/results" --quiet)
    if ((QUICK)); then args+=(--quick); else args+=(--all); fi  # --all: the full sweep, the CNNs at full size
    x "$PY" "${args[@]}"
}

# Data attribution (bench/attribution_digits.py): mislabel detection, then inner products and
# projections against torch.func, dattri and traker (their wheels: --wheels), then the fused
# Gram kernel against two GEMMs (the sweep bench/NOTES.md's prediction asks for).
step_attribution() {
    load
    local args=(bench/attribution_digits.py --device cuda --results-dir "$OUTDIR/results" --quiet)
    if ((QUICK)); then args+=(--epochs 20 --checkpoint-every 10 --train-sizes 2000 --dims 1024 --repeats 1); fi
    x "$PY" "${args[@]}"
}

# DP-SGD (bench/dp_sgd_digits.py) against Opacus, every model, each run whatever the others did;
# without its gloo run, which is on CPU.
step_dp() {
    load
    local model rc=0 args
    for model in mlp sequence cnn; do
        args=(bench/dp_sgd_digits.py --model "$model" --device cuda --processes 0 --results-dir "$OUTDIR/results" --quiet)
        if ((QUICK)); then args+=(--epochs 1); fi
        x "$PY" "${args[@]}" || rc=1
    done
    return "$rc"
}

# A whole DP-SGD step (bench/dp_step.py): BERT-base and GPT-2 small, float32 and bf16 autocast,
# DPSGD against a non-private step, the FLOP bound and Opacus's ghost clipping (issue 28's
# targets; quick: tiny models).
step_dp_step() {
    load
    local args=(bench/dp_step.py --device cuda --setups bert gpt2 --precisions float32 bf16
                --results-dir "$OUTDIR/results" --quiet)
    if ((QUICK)); then args+=(--quick); fi
    x "$PY" "${args[@]}"
}

# worst-case wall time of the selected steps: the sequential ones add up, concurrent ones overlap
worst=0 group=0
for s in "${STEPS[@]}"; do
    runs "$s" || continue
    if parallel "$s"; then
        b=$(budget_of "$s"); ((b > group)) && group=$b
    else
        worst=$((worst + $(budget_of "$s")))
    fi
done
worst=$((worst + group))

header() {
    echo "$PROG: $MODE mode, OUTDIR $OUTDIR"
    echo "  repository $ROOT, python $PY, compute-sanitizer ${SAN:-NOT FOUND}"
    echo -n "  worst case $worst s for the selected steps"
    if ((SERIAL)); then echo -n " (one after another)"; else echo -n " (tests and sanitizers at the same time)"; fi
    if [[ -n $DEADLINE ]]; then
        echo -n "; --deadline $DEADLINE s: budgets cut to the time left, no step starts with under $MIN_LEFT s"
    fi
    echo "${ARCHIVE:+; archive $ARCHIVE}"
}

# ---------------------------------------------------------------- dry run
if ((DRY)); then
    header
    echo "plan (dry run: nothing is run):"
    i=0
    for s in "${STEPS[@]}"; do
        i=$((i + 1))
        if [[ -z ${SELECTED[$s]:-} ]]; then echo "  [$i] $s: skipped (not in --only)"; continue; fi
        if [[ $s == wheels && -z $WHEELS ]]; then echo "  [$i] $s: skipped (no --wheels DIR)"; continue; fi
        extra=""
        if parallel "$s"; then extra=", at the same time as the other checks (tests, sanitizers)"; fi
        echo "  [$i] $s: budget $(budget_of "$s") s$extra, log $OUTDIR/$s.log"
        (cd "$ROOT" && "step_${s//-/_}")
    done
    echo "then: the summary table (step, status, seconds, budget, log) into $OUTDIR/summary.txt, and last on the console"
    exit 0
fi

# ---------------------------------------------------------------- real run
command -v timeout >/dev/null || die "needs GNU timeout (coreutils)"
mkdir -p "$OUTDIR/results"
cd "$ROOT"
STATE=$(mktemp -d)
trap 'rm -rf "$STATE"' EXIT
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
export ROOT OUTDIR PY QUICK DRY WHEELS SAN NCU KERNEL_FILTER TEST_WORKERS MODE PROG SAN_K_FULL SAN_K_QUICK_MEMCHECK \
       SAN_K_QUICK_FEW
export -f q x say load sanitize step_build step_env step_wheels step_tests step_kernels step_profile step_run \
          step_attribution step_dp step_dp_step step_sanitizer_memcheck step_sanitizer_racecheck step_sanitizer_initcheck \
          step_sanitizer_synccheck

now() { date +%s.%N; }
declare -A STATUS=() SECS=() NOTE=() PID=() GIVEN=()
KILL_GRACE=5  # timeout's --kill-after: a step may outlive its budget by this much

given() { echo "${GIVEN[$1]:-$(budget_of "$1")}"; }  # step $1's budget as run

fit() {  # GIVEN[$1]: its budget, cut to what --deadline leaves; fails when that is under MIN_LEFT
    local budget left
    budget=$(budget_of "$1")
    if [[ -n $DEADLINE ]]; then
        left=$(awk -v a="$t_all" -v b="$(now)" -v d="$DEADLINE" -v k="$KILL_GRACE" 'BEGIN { printf "%d", d - (b - a) - k }')
        if ((left < MIN_LEFT || left < 1)); then
            NOTE[$1]="--deadline $DEADLINE s: $((left > 0 ? left : 0)) s left"
            return 1
        fi
        ((budget <= left)) || budget=$left
    fi
    GIVEN[$1]=$budget
}

start_step() {  # runs step $1 in the background: its log, its budget, then "rc seconds" into $STATE/$1
    local s=$1 budget
    budget=$(given "$s")
    printf '==> %-20s budget %3d s, log %s\n' "$s" "$budget" "$OUTDIR/$s.log"
    (
        t0=$(now) rc=0
        timeout --kill-after="$KILL_GRACE" "$budget" bash -c "set -euo pipefail; step_${s//-/_}" \
            </dev/null >"$OUTDIR/$s.log" 2>&1 || rc=$?
        echo "$rc $(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')" >"$STATE/$s"
    ) &
    PID[$s]=$!
}

note_of() {  # a one-line digest of a log: pytest's closing line, the sanitizer's error summary
    local n s
    n=$(grep -aE '^(=+ )?[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran' "$1" 2>/dev/null \
        | tail -n 1 | sed -E 's/^=+ //; s/ =+$//') || true
    s=$(grep -aoE 'ERROR SUMMARY: [0-9]+ errors?' "$1" 2>/dev/null | tail -n 1) || true
    printf '%s' "${n}${n:+${s:+; }}${s}"
}

finish_step() {  # waits for step $1 and records its status
    local s=$1 rc secs
    wait "${PID[$s]}" || true
    read -r rc secs <"$STATE/$s" || { rc=1; secs=0; }
    SECS[$s]=$secs
    if ((rc == 0)); then STATUS[$s]=ok
    elif ((rc == 124)) || { ((rc == 137)) && awk -v t="$secs" -v b="$(given "$s")" 'BEGIN { exit !(t >= b) }'; }; then
        STATUS[$s]=TIMEOUT
        echo "$PROG: TIMEOUT: stopped after its budget of $(given "$s") s" >>"$OUTDIR/$s.log"
    else STATUS[$s]=FAILED; fi
    NOTE[$s]=$(note_of "$OUTDIR/$s.log")
    ((rc == 0)) || NOTE[$s]="exit $rc${NOTE[$s]:+; ${NOTE[$s]}}"
    printf '    %-20s %-7s in %6s s  %s\n' "$s" "${STATUS[$s]}" "$secs" "${NOTE[$s]}"
}

snapshot() {
    [[ -n $ARCHIVE ]] || return 0
    if tar -czf "$ARCHIVE.part" -C "$(dirname "$OUTDIR")" "$(basename "$OUTDIR")" 2>/dev/null; then
        mv -f "$ARCHIVE.part" "$ARCHIVE"
    else
        echo "$PROG: warning: could not write $ARCHIVE" >&2
    fi
}

header
t_all=$(now)
build_failed=0
group=()
for s in "${STEPS[@]}"; do
    if [[ -z ${SELECTED[$s]:-} ]]; then STATUS[$s]=skipped; NOTE[$s]="not in --only"; continue; fi
    if [[ $s == wheels && -z $WHEELS ]]; then STATUS[$s]=skipped; NOTE[$s]="no --wheels DIR"; continue; fi
    if ((build_failed)) && [[ $NEEDS_BUILD == *" $s "* ]]; then
        STATUS[$s]=skipped; NOTE[$s]="the build failed"; continue
    fi
    if ! parallel "$s" && ((${#group[@]})); then  # a sequential step after the concurrent ones: wait for them first
        for g in "${group[@]}"; do finish_step "$g"; done
        group=()
        snapshot
    fi
    if ! fit "$s"; then STATUS[$s]=no-time; continue; fi
    start_step "$s"
    if parallel "$s"; then
        group+=("$s")
        continue
    fi
    finish_step "$s"
    if [[ $s == build && ${STATUS[$s]} != ok ]]; then build_failed=1; fi
    snapshot
done
for g in ${group[@]+"${group[@]}"}; do finish_step "$g"; done
t_total=$(awk -v a="$t_all" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')

failed=() left=()
for s in "${STEPS[@]}"; do
    if [[ ${STATUS[$s]} == FAILED || ${STATUS[$s]} == TIMEOUT ]]; then failed+=("$s"); fi
    if [[ ${STATUS[$s]} == no-time ]]; then left+=("$s"); fi
done
rerun=""
if ((${#left[@]})); then  # the command for what the deadline left: its own OUTDIR, the build and wheels first
    again=""
    for s in "${left[@]}"; do
        if [[ $NEEDS_BUILD == *" $s "* ]]; then again=build,; fi
    done
    if [[ -n $WHEELS ]]; then again+=wheels,; fi
    again+=$(IFS=,; echo "${left[*]}")
    rerun="bash bench/gpu_check.sh ${OUTDIR}-rest --only $again${WHEELS:+ --wheels $WHEELS}${DEADLINE:+ --deadline $DEADLINE}"
    if ((QUICK)); then rerun+=" --quick"; fi
    if ((SERIAL)); then rerun+=" --serial"; fi
fi
for s in ${failed[@]+"${failed[@]}"}; do
    echo
    echo "---- $s ${STATUS[$s]}: the last lines of $OUTDIR/$s.log ----"
    tail -n 25 "$OUTDIR/$s.log" | cut -c 1-240
done

{
    echo
    printf '%-20s %-8s %8s %7s  %s\n' step status seconds budget "log (note)"
    for s in "${STEPS[@]}"; do
        if [[ ${STATUS[$s]} == skipped || ${STATUS[$s]} == no-time ]]; then
            printf '%-20s %-8s %8s %7s  %s\n' "$s" "${STATUS[$s]}" - - "(${NOTE[$s]})"
        else
            printf '%-20s %-8s %8s %7s  %s\n' "$s" "${STATUS[$s]}" "${SECS[$s]}" "$(given "$s")" "$OUTDIR/$s.log"
            if [[ -n ${NOTE[$s]} ]]; then printf '%48s(%s)\n' "" "${NOTE[$s]}"; fi
        fi
    done
    if ((${#failed[@]})); then verdict="FAILED: ${failed[*]}"; else verdict="every step that ran is ok"; fi
    if ((${#left[@]})); then
        verdict+="; NO TIME LEFT for: ${left[*]}"
        echo "to run the steps left: $rerun"
    fi
    printf '%s: %s mode, %s s in all; %s\n' "$PROG" "$MODE" "$t_total" "$verdict"
} | tee "$OUTDIR/summary.txt"
for s in "${STEPS[@]}"; do
    printf '%s\t%s\t%s\t%s\t%s\n' "$s" "${STATUS[$s]}" "${SECS[$s]:-}" "$(given "$s")" "${NOTE[$s]:-}"
done >"$OUTDIR/steps.tsv"
snapshot
((${#failed[@]} == 0 && ${#left[@]} == 0))
