"""The core training path imports with torch, numpy and tokenizers (and pyyaml for the gate):
the heavy optional packages stay lazy, imported where they are used."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("wandb", "mauve", "datasets", "pyarrow", "sacrebleu", "matplotlib", "tqdm", "transformers",
         "huggingface_hub", "faiss", "sklearn", "comet")
CORE = ("gpt", "lora", "muon", "optim", "engine", "probes", "tokenizer", "governance", "sources", "tasks", "batches", "train",
        "checkpoint", "dist", "logging", "files", "cli", "answers", "metrics", "evaluate", "rewards", "reward_model", "grpo",
        "letters", "loader", "published", "policy", "dpo")

CHECK = f"""
import importlib, sys
for name in {HEAVY!r}:
    sys.modules[name] = None  # as if not installed: importing it raises ImportError
for name in {CORE!r}:
    importlib.import_module("nanostoney." + name)
print("ok")
"""


def test_core_path_imports_without_the_heavy_packages():
    r = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
