#!/usr/bin/env bash
# The venv for library backbones (--arch timm:NAME, trainer/backbones.py; README, "Library backbones").
#
#   bash scripts/install-backbones.sh [VENV]     (default .venv-backbones; PYTHON picks the interpreter)
#
# timm needs torchvision, and a torchvision build loads only beside the torch it was built for. The project's
# .venv has the CPU torch 2.13.0, and no torchvision on the index imports beside it (the PyPI builds link
# torch's CUDA libraries), so this venv gets its own pair: torch 2.14.1 + torchvision 0.29.1 (CUDA builds that
# run on the CPU too; about 5.5 GB, most of it NVIDIA's libraries), then the project's dependencies, its dev
# and backbones extras, and the project itself (editable, --no-deps: pyproject.toml pins torch below 2.14 for
# .venv's sake).
#
# Idempotent: a stamp in the venv holds a hash of pyproject.toml and this script; when it matches, nothing is
# done. After a change, a rerun installs only what is missing (pip keeps what already satisfies).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${1:-${BACKBONES_VENV:-.venv-backbones}}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
NEED_GB=7 # the venv's 5.5 GB plus pip's unpacking room
STAMP="$VENV/.installed-backbones"

want=$(cat pyproject.toml "$0" | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "install-backbones: $VENV is up to date (torch $TORCH_VERSION, torchvision $TORCHVISION_VERSION, timm)"
  exit 0
fi

start=$SECONDS
if [ ! -x "$VENV/bin/python" ]; then
  parent=$(dirname "$VENV")
  mkdir -p "$parent"
  free_kb=$(df -Pk "$parent" | awk 'NR == 2 {print $4}')
  if [ "$free_kb" -lt $((NEED_GB * 1024 * 1024)) ]; then
    echo "install-backbones: $((free_kb / 1024 / 1024)) GB free under $parent, the backbones venv needs about" \
      "$NEED_GB GB: free some space (or pass another VENV path)" >&2
    exit 1
  fi
  echo "install-backbones: creating $VENV ($($PYTHON --version))"
  "$PYTHON" -m venv "$VENV"
fi
# pip, quiet, without the "Location ... is ignored" lines this machine's extra indexes print (its status kept)
pip_q() {
  "$VENV/bin/python" -m pip --quiet "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

echo "install-backbones: torch $TORCH_VERSION + torchvision $TORCHVISION_VERSION (a matching pair; ~5.5 GB)"
pip_q install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"

# pyproject.toml's dependencies without torch (installed above), plus the dev and backbones extras.
reqs=$(mktemp)
trap 'rm -f "$reqs"' EXIT
"$VENV/bin/python" - "$reqs" <<'EOF'
import re
import sys
import tomllib

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
wanted = project["dependencies"] + [r for extra in ("dev", "backbones") for r in project["optional-dependencies"][extra]]
name = lambda r: re.match(r"[A-Za-z0-9._-]+", r).group(0).lower().replace("_", "-")  # noqa: E731
with open(sys.argv[1], "w") as f:
    f.writelines(r + "\n" for r in wanted if name(r) != "torch")
EOF
echo "install-backbones: the project's dependencies, dev and backbones extras ($(wc -l <"$reqs") requirements)"
pip_q install -r "$reqs"
echo "install-backbones: the project itself (editable, --no-deps)"
pip_q install --no-deps -e .

"$VENV/bin/python" - <<'EOF'
import timm
import torch
import torchvision

model = timm.create_model("resnet18", pretrained=False, num_classes=0, in_chans=1)
assert model(torch.zeros(2, 1, 32, 32)).shape == (2, model.num_features)
print(f"install-backbones: torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}: import and build")
EOF
echo "$want" >"$STAMP"
echo "install-backbones: $VENV ready in $((SECONDS - start)) s ($(du -sh "$VENV" | cut -f1))"
