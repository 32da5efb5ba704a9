"""logging.py: offline W&B run files and the jsonl record carry the metrics; no secret leaks."""
import builtins
import json
import os
import sys

import pytest
import torch

from nanostoney import logging as nlog
from nanostoney.errors import UserError

FAKE_KEY = "fakeWandbKey_0123456789abcdef_do_not_leak"


def _all_files(root):
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            if os.path.isfile(p):  # wandb leaves symlinks too
                yield p


def _jsonl(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def clean_env(monkeypatch):
    for k in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME", "RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    return monkeypatch


def test_auto_mode_follows_the_key(clean_env):
    assert nlog.resolve_mode("auto") == "offline"
    clean_env.setenv("WANDB_API_KEY", FAKE_KEY)
    assert nlog.resolve_mode("auto") == "online"
    assert nlog.resolve_mode("disabled") == "disabled"
    clean_env.setenv("WANDB_MODE", "offline")
    assert nlog.resolve_mode("auto") == "offline"
    with pytest.raises(UserError, match="unknown --wandb mode"):
        nlog.resolve_mode("sometimes")


def test_offline_run_contains_entropy_keys_and_no_key(clean_env, tmp_path):
    pytest.importorskip("wandb")
    clean_env.setenv("WANDB_API_KEY", FAKE_KEY)  # set, but offline forced: nothing may leak
    config = {"lr": 3e-4, "depth": 2, "api_key": FAKE_KEY, "nested": {"hf_token": "hf_secret_xyz"},
              "note": f"launched with key {FAKE_KEY}"}
    logger = nlog.Logger(mode="offline", project="nanostoney-test", run_name="t",
                         config=config, out_dir=str(tmp_path))
    assert logger.run is not None
    for step in range(3):
        logger.log({"train/loss": torch.tensor(2.0 - step * 0.1), "attn/entropy/layer_0": 1.5,
                    "attn/entropy/layer_1": 1.25, "attn/entropy_mean": 1.375}, step=step)
    logger.log_table("samples", ["prompt", "completion"], [["a", "b"]], step=2)
    logger.summary({"val/bpb": 1.1})
    logger.finish()

    wandb_files = [p for p in _all_files(tmp_path / "wandb") if p.endswith(".wandb")]
    assert wandb_files, "no offline .wandb run file written"
    blob = open(wandb_files[0], "rb").read()
    assert b"attn/entropy/layer_0" in blob and b"attn/entropy_mean" in blob

    rows = _jsonl(tmp_path)
    assert rows[0]["event"] == "config" and rows[0]["config"]["lr"] == 3e-4
    assert rows[0]["config"]["api_key"] == nlog.REDACTED
    assert rows[0]["config"]["nested"]["hf_token"] == nlog.REDACTED
    metric_rows = [r for r in rows if "attn/entropy_mean" in r]
    assert [r["step"] for r in metric_rows] == [0, 1, 2]
    assert metric_rows[0]["attn/entropy/layer_0"] == 1.5
    assert abs(metric_rows[2]["train/loss"] - 1.8) < 1e-6

    for p in _all_files(tmp_path):
        data = open(p, "rb").read()
        assert FAKE_KEY.encode() not in data, f"API key leaked into {p}"
        assert b"hf_secret_xyz" not in data, f"token leaked into {p}"


def test_disabled_mode_still_writes_jsonl(clean_env, tmp_path):
    logger = nlog.Logger(mode="disabled", config={"a": 1}, out_dir=str(tmp_path))
    logger.log({"attn/entropy_mean": 0.5}, step=7)
    logger.finish()
    assert logger.run is None and not (tmp_path / "wandb").exists()
    row = _jsonl(tmp_path)[1]
    assert (row["step"], row["attn/entropy_mean"]) == (7, 0.5)


def test_without_wandb_installed_keeps_jsonl(clean_env, tmp_path, capsys):
    real_import = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb" or name.startswith("wandb."):
            raise ImportError("No module named 'wandb'")
        return real_import(name, *a, **k)

    clean_env.setattr(builtins, "__import__", no_wandb)
    clean_env.delitem(sys.modules, "wandb", raising=False)
    logger = nlog.Logger(mode="offline", out_dir=str(tmp_path))
    logger.log({"attn/entropy/layer_0": 2.0}, step=1)
    logger.finish()
    assert "wandb is not installed" in capsys.readouterr().out
    assert _jsonl(tmp_path)[-1]["attn/entropy/layer_0"] == 2.0


def test_non_master_rank_is_silent(clean_env, tmp_path):
    logger = nlog.Logger(mode="offline", out_dir=str(tmp_path), rank=1)
    logger.log({"x": 1.0}, step=0)
    logger.finish()
    assert logger.run is None and list(tmp_path.iterdir()) == []


def test_init_failure_message_masks_the_key(clean_env, tmp_path):
    wandb = pytest.importorskip("wandb")
    clean_env.setenv("WANDB_API_KEY", FAKE_KEY)

    def boom(**kw):
        raise RuntimeError(f"auth failed for key {FAKE_KEY}")

    clean_env.setattr(wandb, "init", boom)
    with pytest.raises(UserError) as e:
        nlog.Logger(mode="auto", out_dir=str(tmp_path))
    assert FAKE_KEY not in str(e.value) and "auth failed" in str(e.value)
    assert e.value.__suppress_context__  # the original message is not chained into tracebacks

