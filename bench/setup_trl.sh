#!/usr/bin/env bash
# Build (or reuse) a virtual environment with TRL for bench/trl_step.py and tests/test_trl_crosscheck.py.
#
#   bash bench/setup_trl.sh              # -> .venv-trl (a separate venv; .venv is left alone)
#   bash bench/setup_trl.sh .venv        # add TRL to the project's own venv instead
#
# trl 1.16.0 pins neither torch nor transformers (it asks for transformers>=4.56.2, accelerate>=1.10.1,
# datasets>=4.7, pandas, pyarrow>=21, psutil), so it installs on top of r3's own pins (torch 2.13.0 CPU,
# transformers 5.24.0) and only adds datasets, pandas, dill, multiprocess, xxhash and trl. torch goes in
# first and pinned, as in .ci/setup: an unpinned resolve would download a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-trl}
PY=${PYTHON:-python3}
TRL_VERSION=1.16.0
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
# A venv inside the work tree must never be committed (2+ GB): ignore everything in it from inside, as
# Python 3.13's venv does by itself. Files already tracked stay tracked: `git rm -r --cached` those.
[ -f "$VENV/.gitignore" ] || echo '*' > "$VENV/.gitignore"
VPIP="$VENV/bin/python -m pip"
# pip here warns about local mirror folders that do not exist; drop those lines, keep the rest.
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; return "${PIPESTATUS[0]}"; }
if [ ! -f "$VENV/.trl-$TRL_VERSION-installed" ] || [ pyproject.toml -nt "$VENV/.trl-$TRL_VERSION-installed" ]; then
    quiet $VPIP install -q torch==2.13.0
    quiet $VPIP install -q -e ".[dev]"  # r3 itself (tasks, chat rendering, rollout) and its pins
    quiet $VPIP install -q "trl==$TRL_VERSION"
    touch "$VENV/.trl-$TRL_VERSION-installed"
fi
"$VENV/bin/python" -c "import torch, transformers, trl; print(f'trl {trl.__version__}, transformers {transformers.__version__}, torch {torch.__version__}')"
