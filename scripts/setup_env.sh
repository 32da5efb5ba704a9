# Sourced by run_stoney_small.sh and scripts/test.sh: make a fresh machine ready.
# uv manages the environment (as in nanochat); the Rust toolchain builds our BPE trainer (rustbpe/),
# which `uv sync` compiles through maturin. Each tool is installed only when missing.
export PATH="$HOME/.local/bin:$HOME/.cargo/bin:$PATH"

if ! command -v uv >/dev/null 2>&1; then
    # PyPI first (works where only package registries are reachable), then astral's installer.
    python3 -m pip install --quiet --user uv 2>/dev/null \
        || python3 -m pip install --quiet uv 2>/dev/null \
        || curl -LsSf https://astral.sh/uv/install.sh | sh
fi
if ! command -v cargo >/dev/null 2>&1; then
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    export PATH="$HOME/.cargo/bin:$PATH"
fi

# --frozen: install exactly what uv.lock says; this also builds and installs rustbpe.
uv sync --frozen --quiet

# torch.compile (on by default for training on CUDA) compiles C code against Python.h, which a system
# Python without its -dev package lacks: the first compiled step would fail. On a machine with an
# NVIDIA GPU whose interpreter has no headers, switch this checkout to uv's managed CPython 3.12
# (headers included), pinned in .python-version. CPU machines keep their interpreter: nothing is
# compiled there, and the managed download comes from GitHub, which a PyPI-only machine cannot reach.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU' && \
        ! uv run --frozen python -c "import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))"; then
    echo "note: this Python has no Python.h (torch.compile needs it); using uv's managed Python 3.12."
    uv python install 3.12 && uv python pin 3.12 && \
        UV_PYTHON_PREFERENCE=only-managed uv sync --frozen --quiet --python 3.12
fi
