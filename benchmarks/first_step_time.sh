#!/usr/bin/env bash
# Time from launch to the first optimizer step of the SciFact recipe: 1 process vs torchrun with 2 processes.
# Prints one JSON line per run. Usage: bash benchmarks/first_step_time.sh [NPROC]   (results: benchmarks/results/first_step_time.md)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
NPROC=${1:-2}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
stamp() { while IFS= read -r line; do printf '%s %s\n' "$(date +%s.%N)" "$line"; done; }
common=(recipes/scifact.yaml --max_steps 2 --logging_steps 1 --logging_first_step true --train_on_eval_split false
        --keep_untrained_if_better false --save_strategy no)
for procs in 1 "$NPROC"; do
  start=$(date +%s.%N)
  if [ "$procs" = 1 ]; then launcher=(python); else launcher=(torchrun --nproc_per_node "$procs"); fi
  "${launcher[@]}" recipes/train.py "${common[@]}" --output_dir "$WORK/out$procs" 2>&1 | stdbuf -oL tr '\r' '\n' | stamp > "$WORK/log$procs"
  end=$(date +%s.%N)
  first=$(grep -m1 "'loss'" "$WORK/log$procs" | cut -d' ' -f1)
  python -c "import json; print(json.dumps({'processes': $procs, 'to_first_step_s': round($first - $start, 1), 'total_s': round($end - $start, 1)}))"
done
