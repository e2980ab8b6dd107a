#!/usr/bin/env bash
# Forgetting, measured: train `lowercase`, continue it on `uppercase` without and with replaying lowercase's
# data, serve the three versions on one base, and score each on both tasks' held-out prompts and IFEval
# (`client bench --lineage`): OUT/bench/lineage.md, lineage.json and forgetting.png.
#
#   examples/forgetting.sh [OUT]        # default OUT: forgetting-out; SmolLM2 (python -m finetune base ...)
#   BASE=.cache/tiny-base CONFIG=configs/tiny-demo.yaml STEPS=40 examples/forgetting.sh /tmp/forgetting
#
# Knobs (environment): BASE, CONFIG, STEPS (optimizer steps per run), N_TRAIN and N_TEST (items per task),
# REPLAY (records of the parent's data replayed), LIMIT (prompts per column), PORT, SERVE_ARGS, PYTHON.
set -euo pipefail

OUT=${1:-forgetting-out}
PYTHON=${PYTHON:-python}
BASE=${BASE:-.cache/smollm2-135m-instruct}
CONFIG=${CONFIG:-configs/smollm2-135m-instruct-lora.yaml}
STEPS=${STEPS:-30}
N_TRAIN=${N_TRAIN:-200}
N_TEST=${N_TEST:-48}
REPLAY=${REPLAY:-200}
LIMIT=${LIMIT:-48}
PORT=${PORT:-8011}
SERVE_ARGS=${SERVE_ARGS:---enforce-eager --max-model-len 2048 --kv-cache-memory-bytes 1073741824}

data=$OUT/data
adapters=$OUT/adapters
mkdir -p "$OUT"
"$PYTHON" -m client tasks --out "$data/lowercase" --families lowercase \
  --n-train "$N_TRAIN" --n-test "$N_TEST" --seed 0
"$PYTHON" -m client tasks --out "$data/uppercase" --families uppercase \
  --n-train "$N_TRAIN" --n-test "$N_TEST" --seed 1

train() {  # NAME, then overrides
  local name=$1
  shift
  "$PYTHON" -m finetune run --config "$CONFIG" base_model="$BASE" output_dir="$adapters/$name" overwrite=true \
    training.max_steps="$STEPS" "$@" 2>&1 | grep -v '\[.*step/s\|it/s\]' | tail -n 3
}
train lowercase data.path="$data/lowercase/train.jsonl"
train uppercase init_from="$adapters/lowercase" data.path="$data/uppercase/train.jsonl"
train uppercase-replay init_from="$adapters/lowercase" data.path= \
  "data.sources=[{path: $data/uppercase/train.jsonl}, {path: '@parent', count: $REPLAY}]"

# shellcheck disable=SC2086  # SERVE_ARGS is a list of flags
"$PYTHON" -m serve --base-model "$BASE" --adapters-dir "$adapters" --host 127.0.0.1 --port "$PORT" \
  --max-loras 3 --max-lora-rank 16 $SERVE_ARGS > "$OUT/server.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' \
    "http://127.0.0.1:$PORT/health" 2> /dev/null && break
  kill -0 "$server" 2>/dev/null || { echo "the server stopped; see $OUT/server.log" >&2; exit 1; }
  sleep 1
done
# The cache scope names the models, not the port, so a rerun against a restarted server reuses the answers.
"$PYTHON" -m client bench --base-url "http://127.0.0.1:$PORT/v1" --out "$OUT/bench" --limit "$LIMIT" \
  --lineage "$adapters/uppercase,$adapters/uppercase-replay" --cache-scope "forgetting:$BASE" --no-progress
cat "$OUT/bench/lineage.md"
