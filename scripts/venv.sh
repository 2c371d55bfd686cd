#!/usr/bin/env bash
# Prints the path of the cached virtualenv for a requirement set (default: dev), creating or updating it first.
# The venv lives outside the checkout, so every clone on a machine (CI's included) reuses one PyTorch install;
# when requirements/*.txt change, pip brings the same venv up to date instead of starting over.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
cache=${FEDNESTED_CACHE:-$HOME/.cache/fednested}
set_name=${1:-dev}
tag=$("$py" -c 'import sys; print("py%d%d" % sys.version_info[:2])')
venv="$cache/venv-$set_name-$tag"
# An overlay set is a venv of its own layered over a base set's: a .pth file appends the base venv's site-packages to
# sys.path, after the overlay's own, so what the overlay installs (pins that conflict with the base set's) wins and
# everything else comes from the base. requirements/flower.txt and requirements/mlflow.txt say why each needs this.
case "$set_name" in
  flower | mlflow) base_venv=$("$0" dev) ;;
  *) base_venv= ;;
esac
key=$(cat "$here"/requirements/*.txt | sha256sum | cut -c1-16)
stamp="$venv/.fednested-requirements"
if [ ! -x "$venv/bin/python" ]; then
  echo "creating virtualenv $venv" >&2
  mkdir -p "$cache"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$key" ]; then
  if [ -n "$base_venv" ]; then
    purelib='import sysconfig; print(sysconfig.get_path("purelib"))'
    "$base_venv/bin/python" -c "$purelib" >"$("$venv/bin/python" -c "$purelib")/zz-fednested-base.pth"
  fi
  echo "installing requirements/$set_name.txt into $venv" >&2
  (cd "$here/requirements" && "$venv/bin/python" -m pip install -q -r "$set_name.txt" >&2)
  echo "$key" >"$stamp"
fi
echo "$venv"
