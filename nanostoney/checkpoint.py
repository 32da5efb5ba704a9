"""Checkpoints: our own directories (atomic, resumable) and published models, behind one load_model.

    out/
      latest                  text: "step_000200", replaced atomically only after the save
      step_000200/            written as step_000200.tmp-<pid>, fsynced, then renamed
        config.json           GPTConfig
        model.pt              state dict (LoRA keys too); or, adapter-only, adapters.pt and
        adapter_config.json   rank/alpha/targets and the base checkpoint they fit
        tokenizer/            a copy of the tokenizer, so the checkpoint is self-contained
        optim.pt, rng.pt      optimizer state and every rank's RNG states (exact resume)
        meta.json             step, time, git commit, data sources, ...; written last

A crash at any moment leaves `latest` naming a complete checkpoint (or absent). Only rank 0 saves;
every rank calls gather_rng_states(). load_checkpoint restores weights, optimizer and RNG into
objects the caller built (--resume); load_model reads ours and published models (published.py).
"""
import contextlib
import os
import random
import re
import shutil
import subprocess
import time
from dataclasses import asdict

import numpy as np
import torch

from nanostoney import lora, published
from nanostoney.dist import gather_lists
from nanostoney.errors import UserError
from nanostoney.files import pid_alive, read_json, read_torch, save_torch, write_failed, write_json
from nanostoney.gpt import GPT, unwrap
from nanostoney.logging import scrub
from nanostoney.published import check_same_shape, check_vocab, config_from_dict, load_weights
from nanostoney.tokenizer import Tokenizer

FORMAT = "nanostoney-checkpoint-1"
LATEST = "latest"
MODEL_FILE, CONFIG_FILE, META_FILE = "model.pt", "config.json", "meta.json"
OPTIM_FILE, RNG_FILE, TOKENIZER_DIR = "optim.pt", "rng.pt", "tokenizer"
STEP_RE = re.compile(r"^step_(\d+)$")
DAMAGED = "the checkpoint is incomplete or damaged, or the path is wrong"


def step_dir_name(step):
    return f"step_{step:06d}"


def rng_state():
    """This process's RNG states, in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states():
    """Every rank's rng_state(), as a list indexed by rank (call on all ranks)."""
    return gather_lists([rng_state()])


def git_commit():
    """The commit of the code that wrote the checkpoint (None outside a git checkout)."""
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                           capture_output=True, text=True, timeout=10)
        return (r.stdout.strip() or None) if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _fsync_tree(root):
    """Flush every file and directory under root to disk, so the rename publishes real bytes."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(dirpath, name))
        _fsync_dir(dirpath)


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path):
    with contextlib.suppress(OSError):  # platforms without directory handles (Windows)
        _fsync(path)


def _read_config(ckpt):
    path = os.path.join(ckpt, CONFIG_FILE)
    return config_from_dict(read_json(path, DAMAGED), path)


def _apply_saved_lora(model, sd, ckpt):
    """Adapters shaped as the checkpoint's adapter config says, when its weights hold LoRA keys."""
    if any(k.endswith(".lora_A") for k in sd):
        acfg = lora.read_adapter_config(ckpt)
        lora.apply_lora(model, acfg["rank"], acfg["alpha"], acfg.get("dropout", 0.0), acfg["targets"])


def read_meta_if_any(ckpt):
    """read_meta, or {} when there is no meta.json; "checkpoint" names the directory."""
    meta = read_meta(ckpt) if os.path.isfile(os.path.join(ckpt, META_FILE)) else {}
    meta.setdefault("checkpoint", os.path.abspath(ckpt))
    return meta


def read_meta(ckpt):
    """A checkpoint's meta.json: a JSON object with an integer step, else one sentence."""
    path = os.path.join(ckpt, META_FILE)
    meta = read_json(path, DAMAGED)
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or meta["step"] < 0:
        raise UserError(f"{path} is not a checkpoint's meta (a JSON object with an integer 'step'); the "
                        f"checkpoint is damaged: point at another one.")
    return meta


def save_checkpoint(out_dir, model, step, optimizer=None, meta=None, tokenizer_dir=None,
                    tokenizer=None, rng_states=None, base_checkpoint=None, keep_last=None, replace=False):
    """Write out_dir/step_XXXXXX atomically, point `latest` at it, return its path; a failed write
    leaves every checkpoint and `latest` as they were (RunFailed). With LoRA adapters and
    base_checkpoint only the adapters are written. optimizer: one or a list; meta: JSON-able, secrets
    redacted; rng_states: gather_rng_states(); replace: this step's directory may be replaced."""
    model = unwrap(model)
    name = step_dir_name(step)
    final = os.path.join(out_dir, name)
    if os.path.exists(final) and not replace:
        raise UserError(f"{final} already exists and holds other weights; nothing was replaced (continue that "
                        f"run with --resume, or pass --overwrite to replace it).")
    tmp = f"{final}.tmp-{os.getpid()}"
    try:
        os.makedirs(out_dir, exist_ok=True)
        _remove_stale_tmp(out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        _write_step(tmp, model, step, optimizer, meta, tokenizer_dir, tokenizer, rng_states, base_checkpoint)
        _publish(tmp, final)
        _set_latest(out_dir, name)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_failed(final, e, kept=f"no checkpoint was replaced and {os.path.join(out_dir, LATEST)} "
                               f"still names the last complete one") from None
        raise
    if keep_last:
        _prune(out_dir, keep_last, keep=name)
    return final


def _write_step(tmp, model, step, optimizer, meta, tokenizer_dir, tokenizer, rng_states, base_checkpoint):
    """Every file of one checkpoint into the directory `tmp`; meta.json last (it marks complete)."""
    write_json(os.path.join(tmp, CONFIG_FILE), asdict(model.config))
    if lora.lora_modules(model) and base_checkpoint is not None:
        lora.write_adapter_files(model, tmp, base_checkpoint)
    else:
        if any(m.merged for _, m in lora.lora_modules(model)):
            raise UserError("the LoRA adapters are merged into the weights; unmerge_lora() "
                            "or remove_lora() before saving.")
        save_torch({k: v.detach().cpu() for k, v in model.state_dict().items()}, os.path.join(tmp, MODEL_FILE))
        if lora.lora_modules(model):
            write_json(os.path.join(tmp, lora.ADAPTER_CONFIG), lora.adapter_config(model))
    if tokenizer_dir is not None:  # its files, not its sub-folders
        os.makedirs(os.path.join(tmp, TOKENIZER_DIR))
        for name in os.listdir(tokenizer_dir):
            if os.path.isfile(os.path.join(tokenizer_dir, name)):
                shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(tmp, TOKENIZER_DIR))
    elif tokenizer is not None:
        tokenizer.save(os.path.join(tmp, TOKENIZER_DIR))
    if optimizer is not None:
        state = ([o.state_dict() for o in optimizer] if isinstance(optimizer, (list, tuple))
                 else optimizer.state_dict())
        save_torch(state, os.path.join(tmp, OPTIM_FILE))
    save_torch({"per_rank": rng_states if rng_states is not None else [rng_state()]}, os.path.join(tmp, RNG_FILE))
    full_meta = {"format": FORMAT, "step": int(step), "time": time.time(),
                 "git_commit": git_commit(), "torch_version": torch.__version__,
                 "config": asdict(model.config), **scrub(dict(meta or {}))}
    write_json(os.path.join(tmp, META_FILE), full_meta)  # last: its presence marks complete
    _fsync_tree(tmp)


def _publish(tmp, final):
    """rename tmp -> final; an older `final` is moved aside first and deleted after, never mixed in."""
    old = f"{final}.old-{os.getpid()}" if os.path.exists(final) else None
    if old:
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(os.path.dirname(final))
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _set_latest(out_dir, name):
    tmp = os.path.join(out_dir, f"{LATEST}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(out_dir, LATEST))
    _fsync_dir(out_dir)


def _remove_stale_tmp(out_dir):
    """Leftovers of our saves whose process crashed; only our own names (a user's x.tmp-123 is theirs)."""
    for entry in os.listdir(out_dir):
        m = re.fullmatch(r"(?:step_\d+|latest)\.(?:tmp|old)-(\d+)", entry)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            p = os.path.join(out_dir, entry)
            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.remove(p)


def saved_steps(out_dir):
    """[(step, step dir name)] of the complete checkpoints under a run dir, oldest first."""
    return sorted((int(m.group(1)), e) for e in os.listdir(out_dir)
                  for m in [STEP_RE.match(e)] if m and os.path.isfile(os.path.join(out_dir, e, META_FILE)))


def _prune(out_dir, keep_last, keep):
    """Keep the newest keep_last step directories up to `keep` (steps past it are another run's)."""
    upto = int(STEP_RE.match(keep).group(1))
    for _, entry in [d for d in saved_steps(out_dir) if d[0] <= upto][:-keep_last]:
        if entry != keep:
            shutil.rmtree(os.path.join(out_dir, entry), ignore_errors=True)


def latest_checkpoint(out_dir):
    """The newest complete checkpoint under a run dir (following `latest`), a step dir itself, or None."""
    if not os.path.isdir(out_dir):
        return None
    if os.path.isfile(os.path.join(out_dir, META_FILE)):
        return out_dir
    pointer = os.path.join(out_dir, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            cand = os.path.join(out_dir, f.read().strip())
        if os.path.isfile(os.path.join(cand, META_FILE)):
            return cand
    steps = saved_steps(out_dir)  # pointer missing or stale: the newest complete step dir
    return os.path.join(out_dir, steps[-1][1]) if steps else None


def load_checkpoint(path, model, optimizer=None, rank=0):
    """Restore weights, optimizer and this rank's RNG from a step or run dir into the caller's objects; meta."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist; check the path (or --out of the run).")
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise UserError(f"{path} holds no complete checkpoint (no meta.json, no `latest`).")
    model = unwrap(model)
    check_same_shape(_read_config(ckpt), model.config, ckpt)
    if os.path.isfile(os.path.join(ckpt, MODEL_FILE)):
        sd = read_torch(os.path.join(ckpt, MODEL_FILE))
        if not lora.lora_modules(model):
            _apply_saved_lora(model, sd, ckpt)
        load_weights(model, sd, ckpt)
    else:
        lora.load_adapters(model, ckpt)
    if optimizer is not None:
        state = read_torch(os.path.join(ckpt, OPTIM_FILE))
        for o, s in zip(optimizer, state) if isinstance(optimizer, (list, tuple)) else [(optimizer, state)]:
            o.load_state_dict(s)
    if os.path.isfile(os.path.join(ckpt, RNG_FILE)):
        per_rank = read_torch(os.path.join(ckpt, RNG_FILE))["per_rank"]
        if rank < len(per_rank):  # a different world size cannot be resumed bit-exactly anyway
            set_rng_state(per_rank[rank])
    return read_meta(ckpt)


def _load_tokenizer(directory, cfg):
    """Our tokenizer from a checkpoint's tokenizer/ (None when the checkpoint has none)."""
    tdir = os.path.join(directory, TOKENIZER_DIR)
    tok = Tokenizer.load(tdir) if os.path.isdir(tdir) else None
    check_vocab(tok, cfg, directory)
    return tok


def load_model(path, device="cpu"):
    """(model in eval mode, tokenizer or None, meta) of a run, step, LoRA adapter or published model dir."""
    path = published.resolve(path)
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist; check the path.")
    if not os.path.isdir(path):
        raise UserError(f"{path} is a file; pass the checkpoint directory that contains it.")
    if published.kind(path):
        return published.load(path, device=device)
    ckpt = latest_checkpoint(path) or path
    if not os.path.isfile(os.path.join(ckpt, MODEL_FILE)):
        if os.path.isfile(os.path.join(ckpt, lora.ADAPTER_FILE)):
            return _load_adapter_dir(ckpt, device)
        raise UserError(f"{path} is not a checkpoint: expected {CONFIG_FILE} + {MODEL_FILE} (nanostoney), "
                        f"{lora.ADAPTER_CONFIG} + {lora.ADAPTER_FILE} (LoRA adapters), model_XXXXXX.pt + "
                        f"meta_XXXXXX.json (nanochat), or config.json + model.safetensors (transformers).")
    cfg = _read_config(ckpt)
    sd = read_torch(os.path.join(ckpt, MODEL_FILE))
    model = GPT(cfg)
    _apply_saved_lora(model, sd, ckpt)
    load_weights(model, sd, ckpt)
    return model.to(device).eval(), _load_tokenizer(ckpt, cfg), read_meta_if_any(ckpt)


def _load_adapter_dir(path, device):
    base = lora.base_checkpoint_of(path)
    if base is None:
        raise UserError(f"the adapters in {path} do not name their base checkpoint; load the base "
                        f"with load_model(base) and then lora.load_adapters(model, '{path}').")
    model, tokenizer, base_meta = load_model(base, device="cpu")
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        check_same_shape(_read_config(path), model.config, f"the base of {path} ({base})")
    lora.load_adapters(model, path)
    meta = {**read_meta_if_any(path), "base": base_meta}
    return model.to(device).eval(), _load_tokenizer(path, model.config) or tokenizer, meta


def load_for_training(init, full=False, rank=16, alpha=32.0, targets="all", dropout=0.0, device="cpu"):
    """(model, tokenizer, checkpoint dir, base that adapter saves name or None) a fine-tuning stage starts
    from: the init's adapters go on training (on their base), else fresh adapters go on the loaded
    weights (the base); full: adapters merged, every parameter trains."""
    local = published.resolve(init)
    if published.kind(local):
        model, tok, meta = published.load(local, device=device)
        ckpt = meta["checkpoint"]
        if tok is None:
            raise UserError(f"--init {init}: the {meta.get('source', 'published')} model in {ckpt} has no "
                            f"tokenizer; put its tokenizer.pkl (or tokenizer.json) beside the weights.")
    else:
        ckpt = latest_checkpoint(local) if os.path.isdir(local) else None
        if ckpt is None:
            raise UserError(f"--init {init}: no checkpoint there; point it at the --out of the stage before "
                            f"(scripts.base_train for SFT, scripts.sft_train for the others) or a nanochat model.")
        model, tok, _ = load_model(ckpt, device=device)
        if tok is None:
            raise UserError(f"{ckpt} has no tokenizer (nor does its base); re-save it with its tokenizer.")
    published.check_chat_tokens(tok, init)
    has_adapters = bool(lora.lora_modules(model))
    if full:
        if has_adapters:
            lora.remove_lora(model, merge=True)
        model.requires_grad_(True)
        return model, tok, ckpt, None
    if has_adapters:
        return model, tok, ckpt, lora.base_checkpoint_of(ckpt)
    lora.apply_lora(model, rank, alpha, dropout, targets)
    return model, tok, ckpt, ckpt
