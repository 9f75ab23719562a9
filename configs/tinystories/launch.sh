# Sourced by run.sh and ensemble.sh with their arguments: REALDATA_DIR [NPROC].
# Sets REAL, NPROC, PY, OUT, LAUNCH (python -m, or torchrun --standalone with NPROC ranks),
# the thread count (2 cores shared by the ranks) and WANDB_MODE, and creates OUT.
set -euo pipefail
REAL=${1:?usage: $0 REALDATA_DIR [NPROC]}
NPROC=${2:-1}
PY=${PY:-.venv/bin/python}
OUT=runs/tinystories
if [ "$NPROC" -gt 1 ]; then LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m);
else LAUNCH=("$PY" -m); fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((2 / NPROC > 0 ? 2 / NPROC : 1))} WANDB_MODE=${WANDB_MODE:-disabled}
mkdir -p "$OUT"
