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
