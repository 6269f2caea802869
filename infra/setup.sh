#!/usr/bin/env bash
# Everything a fresh machine needs, idempotent and quick when already done:
#   Debian packages (Java, Maven, EGL/OSMesa for headless MuJoCo rendering),
#   the virtual environment with every Python dependency resolved in ONE pip run (see requirements.lock),
#   the Kafka broker jars and Kafka's command-line tools (kafka-tools, for `sop kafka`) resolved by Maven
#   into ~/.cache/sop (never into the repository), and the cluster profile's S3 server (SeaweedFS, built with
#   Go from the module proxy into ~/.cache/sop/bin once: ~8 min on 2 cores the first time, nothing after).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SOP_VENV:-.venv}
stamp="$VENV/.sop-installed"

need_apt=()
while read -r pkg; do
  [[ -z "$pkg" || "$pkg" == \#* ]] && continue
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done < infra/apt-packages.txt
if ((${#need_apt[@]})); then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup: creating virtual environment $VENV"
  $PY -m venv "$VENV"
fi
hash_now=$(cat pyproject.toml requirements.lock | sha256sum | cut -d' ' -f1)
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$hash_now" ]]; then
  echo "setup: installing Python packages (one resolution, pinned by requirements.lock; torch is large the first time)"
  "$VENV/bin/python" -m pip install -q --upgrade pip wheel
  # One pip run: faust-streaming's click<8.4 and transformers' huggingface-hub must be resolved together.
  "$VENV/bin/python" -m pip install -q -c requirements.lock -e '.[dev]'
  "$VENV/bin/python" -m pip check
  echo "$hash_now" > "$stamp"
fi

# LeRobot's own loader for the test that reads our LeRobot export with it (infra/lerobot-check.txt says why a venv
# of its own): inside ours, seeing our packages through a .pth line, adding only lerobot's dataset-code imports.
LEROBOT_VENV="$VENV/lerobot"
lr_stamp="$LEROBOT_VENV/.sop-installed"
lr_hash=$(cat infra/lerobot-check.txt | sha256sum | cut -d' ' -f1)
if [[ ! -f "$lr_stamp" || "$(cat "$lr_stamp")" != "$lr_hash" ]]; then
  echo "setup: installing LeRobot's dataset loader into $LEROBOT_VENV (for the LeRobot export test)"
  rm -rf "$LEROBOT_VENV"
  "$VENV/bin/python" -m venv "$LEROBOT_VENV"
  ours=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  theirs=$("$LEROBOT_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  echo "$ours" > "$theirs/_sop_venv.pth"
  "$LEROBOT_VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r infra/lerobot-check.txt
  HF_HUB_OFFLINE=1 "$LEROBOT_VENV/bin/python" -c 'from lerobot.datasets.lerobot_dataset import LeRobotDataset'
  echo "$lr_hash" > "$lr_stamp"
fi

"$VENV/bin/python" - <<'PY'
from pathlib import Path
from infra.kafka import DEFAULT_KAFKA_VERSION, resolve_jars, KafkaBrokerConfig
from infra.kafka_tools import resolve_tool_jars
cache = KafkaBrokerConfig(data_dir=Path(".")).jar_cache
libs = resolve_jars(DEFAULT_KAFKA_VERSION, cache)
tools = resolve_tool_jars(DEFAULT_KAFKA_VERSION, cache)
print(f"setup: Kafka {DEFAULT_KAFKA_VERSION} jars in {libs}, its command-line tools in {tools}")
PY

# Go for the SeaweedFS build: the machine's own toolchain, else Debian's (GOTOOLCHAIN=auto then fetches the Go
# release SeaweedFS's go.mod asks for, as a module from the Go module proxy).
if ! command -v go >/dev/null 2>&1 && [[ ! -x /usr/local/go/bin/go ]]; then
  echo "setup: installing Go (Debian golang-go) to build SeaweedFS"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends golang-go >/dev/null
fi
"$VENV/bin/python" - <<'PY'
import time
from infra.objectstore import CACHE, SEAWEEDFS_VERSION, build_weed, weed_binary
if weed_binary().exists():
    print(f"setup: SeaweedFS {SEAWEEDFS_VERSION} in {weed_binary()}")
else:
    print(f"setup: building SeaweedFS {SEAWEEDFS_VERSION} (the cluster profile's S3 server; minutes, once per machine)")
    t0 = time.monotonic()
    path = build_weed(log=CACHE / "seaweedfs-build.log")
    print(f"setup: SeaweedFS built in {time.monotonic() - t0:.0f} s: {path}")
PY
