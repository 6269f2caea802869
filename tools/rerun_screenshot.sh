#!/usr/bin/env bash
# Regenerates docs/rerun-episode.png: a real episode (MetaWorld robot, the simulated operator, the noisy
# scripted expert as policy) through a local stack (Kafka, `sop process`, Delta), saved with `sop view --save`
# and rendered by Rerun's own viewer, headless (tools/rerun_screenshot.py; software Vulkan is enough:
# apt-get install mesa-vulkan-drivers).
#   bash tools/rerun_screenshot.sh [OUT.png]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/rerun-episode.png}
RUN=$(mktemp -d /tmp/sop-shot-XXXX)
export SOP_RUN_DIR=$RUN SOP_KAFKA_PORT=0 SOP_ACTOR_EXPERT_NOISE=0.6 SOP_MAX_EPISODE_STEPS=150 MUJOCO_GL=egl
SOP=".venv/bin/python -m sop"
cleanup() { [[ -n "${PROC:-}" ]] && kill "$PROC" 2>/dev/null; $SOP down >/dev/null 2>&1 || true; }
trap cleanup EXIT
$SOP up
$SOP actor --tasks drawer-open-v3 --episodes 3 --hz 0 --register-expert-if-missing --no-status --actor-id shot
$SOP process > "$RUN/process.log" 2>&1 &
PROC=$!
query="SELECT count(*) AS n FROM episodes"
until [[ "$($SOP sql "$query" --format csv 2>/dev/null | tail -1 | tr -d '"')" == "3" ]]; do sleep 2; done
kill "$PROC"; wait "$PROC" || true; PROC=
# the episode with the most takeovers (the first of them when several tie)
$SOP sql "SELECT episode_id, num_interventions, human_steps, outcome FROM episodes ORDER BY num_interventions DESC, start_time"
EPISODE=$($SOP sql "SELECT episode_id FROM episodes ORDER BY num_interventions DESC, start_time LIMIT 1" --format csv | tail -1 | tr -d '"')
$SOP view "$EPISODE" --save "$RUN/episode.rrd"
FRAME=$($SOP sql "SELECT min(step_index) + 4 FROM interventions WHERE episode_id = '$EPISODE' AND kind = 'STARTED'" \
  --format csv | tail -1 | tr -d '"')
RERUN_ANALYTICS=0 XDG_RUNTIME_DIR=$RUN WGPU_BACKEND=vulkan timeout 180 \
  .venv/bin/python tools/rerun_screenshot.py "$RUN/episode.rrd" "$OUT" --frame "${FRAME:-20}"
echo "wrote $OUT from episode $EPISODE (time cursor on frame ${FRAME:-20})"
