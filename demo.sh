#!/usr/bin/env bash
# The main command: EmoLA end to end on synthetic faces (data -> tokenizer -> shards -> training
# -> emola-eval on held-out faces -> emola-infer on two real photos -> summary), on a CPU.
# The first run creates .venv (launch/setup_env.sh); later runs reuse it. Flags go to
# `python -m emola_jax.demo` (--help lists them), e.g. ./demo.sh --ablation --workdir=runs/demo2
set -euo pipefail
cd "$(dirname "$0")"
bash launch/setup_env.sh
exec "${EMOLA_VENV:-.venv}/bin/python" -m emola_jax.demo "$@"
