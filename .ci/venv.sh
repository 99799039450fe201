#!/usr/bin/env bash
# Print the path of a ready virtual environment with requirements-dev.txt installed.
# Installing torch 2.14.1 (+cu130, ~5.5 GB) takes ~8 minutes on the 2-core CI machine,
# so the venv lives outside the clone, keyed by a hash of the torch pin: it is
# created when absent (a fresh machine still works) and reused otherwise.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
key=$( (cat "$root/requirements-torch.txt"; python3 --version) | sha256sum | cut -c1-16)
venv="${HCEXT_VENV_ROOT:-$HOME/.cache/hcext}/venv-$key"
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -r "$root/requirements-torch.txt" >&2
  touch "$venv/.complete"
fi
"$venv/bin/python" -m pip install -q -r "$root/requirements-dev.txt" >&2
echo "$venv"
