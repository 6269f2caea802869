#!/usr/bin/env bash
# Everything a fresh machine needs, idempotent and quick when already done:
#   Debian packages (Java, Maven, EGL/OSMesa for headless MuJoCo rendering),
#   the virtual environment with every Python dependency resolved in ONE pip run (see requirements.lock),
#   and the Kafka broker jars and Kafka's command-line tools (kafka-tools, for `sop kafka`) resolved by Maven
#   into ~/.cache/sop (never into the repository).
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

"$VENV/bin/python" - <<'PY'
from pathlib import Path
from infra.kafka import DEFAULT_KAFKA_VERSION, resolve_jars, KafkaBrokerConfig
from infra.kafka_tools import resolve_tool_jars
cache = KafkaBrokerConfig(data_dir=Path(".")).jar_cache
libs = resolve_jars(DEFAULT_KAFKA_VERSION, cache)
tools = resolve_tool_jars(DEFAULT_KAFKA_VERSION, cache)
print(f"setup: Kafka {DEFAULT_KAFKA_VERSION} jars in {libs}, its command-line tools in {tools}")
PY
