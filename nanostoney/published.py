"""Models published elsewhere, loaded as our GPT (gpt.py keeps nanochat's module names):

    model, tokenizer, meta = load(resolve("hf:karpathy/nanochat-d32"))   # what load_model calls

- nanochat (Oct 2025): model_XXXXXX.pt + meta_XXXXXX.json, tokenizer.pkl beside them, in
  tokenizer/ beside them, or two levels up (nanochat's ~/.cache/nanochat/base_checkpoints/d20).
- transformers (models/nanochat): config.json with model_type "nanochat", model.safetensors (or
  shards; read without the `safetensors` package), tokenizer.json.
- hf:OWNER/NAME[/SUBDIR]: snapshot_download into the hub cache (optimizer shards left out).
"""
import json
import os
import re
import struct
from dataclasses import fields

import torch

from nanostoney.errors import UserError
from nanostoney.files import read_json, read_torch
from nanostoney.gpt import GPT, NUMERICS, SOFTCAP, GPTConfig
from nanostoney.tokenizer import Tokenizer

NANOCHAT_MODEL_RE = re.compile(r"^model_(\d+)\.pt$")
CHAT_TOKENS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>")
HF_PREFIX = "hf:"
SHAPE_FIELDS = ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")  # sequence_len may differ


def resolve(path):
    """A local directory for `path`: hf:OWNER/NAME[/SUBDIR] downloaded once, anything else as given."""
    if not str(path).startswith(HF_PREFIX):
        return path
    parts = str(path)[len(HF_PREFIX):].strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise UserError(f"{path}: a hub model is hf:OWNER/NAME (optionally /SUBDIR inside it).")
    repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:])
    local = os.path.join(download(repo_id), sub)
    if not os.path.isdir(local):
        raise UserError(f"{path}: the hub repository {repo_id} has no folder {sub!r}.")
    return local


def download(repo_id):
    """The local snapshot of a hub model repository (optimizer states are not fetched)."""
    from huggingface_hub import constants, snapshot_download  # lazy: only hf: ids need it
    try:
        return snapshot_download(repo_id, ignore_patterns=["optim_*"])
    except Exception as e:  # offline and not cached, no such repo, gated...: the same to the user
        if constants.HF_HUB_OFFLINE:
            raise UserError(f"hf:{repo_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                            f"HF_HUB_OFFLINE is set; download it once online or pass a local directory.") from None
        raise UserError(f"could not download hf:{repo_id} from the Hugging Face Hub ({type(e).__name__}); "
                        f"check the name and the connection, or pass a local directory.") from None


def kind(path):
    """"nanochat", "hf" (transformers layout) or None (not a published format we read)."""
    if _nanochat_model_dir(path):
        return "nanochat"
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return "hf" if json.load(f).get("model_type") == "nanochat" else None
    except (OSError, ValueError, AttributeError):
        return None


def load(path, device="cpu"):
    """(model in eval mode, tokenizer or None, meta) of a published model directory."""
    return load_nanochat(path, device=device) if kind(path) == "nanochat" else load_hf(path, device=device)


def check_chat_tokens(tokenizer, where):
    """The special tokens our chat format renders, by name; one sentence naming a missing one."""
    missing = [t for t in CHAT_TOKENS if not tokenizer.has_special(t)]
    if missing:
        has = sorted(t.content for t in tokenizer.hf.get_added_tokens_decoder().values())
        raise UserError(f"the tokenizer of {where} has no {', '.join(missing)} special token (it has "
                        f"{', '.join(has) or 'none'}), which the chat format needs; use the model's nanochat "
                        f"tokenizer.")


def describe(cfg):
    return ", ".join(f"{k}={getattr(cfg, k)}" for k in SHAPE_FIELDS)


def describe_weights(sd):
    """The shape a state dict implies (heads are not visible in weights, widths are)."""
    sd = {k.removeprefix("_orig_mod."): v for k, v in sd.items()}
    wte, ck = sd.get("transformer.wte.weight"), sd.get("transformer.h.0.attn.c_k.weight")
    layers = {int(m.group(1)) for k in sd for m in [re.search(r"transformer\.h\.(\d+)\.", k)] if m}
    parts = [f"vocab_size={wte.shape[0]}", f"n_embd={wte.shape[1]}"] if wte is not None else []
    parts.append(f"n_layer={max(layers) + 1 if layers else 0}")
    return ", ".join(parts + ([f"kv width={ck.shape[0]}"] if ck is not None else []))


def config_from_dict(d, where):
    if not isinstance(d, dict):
        raise UserError(f"{where} is not a model config (a JSON object); the checkpoint is damaged.")
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise UserError(f"{where} has model settings {unknown} that nanostoney's GPT does not "
                        f"implement (a newer architecture?); only {sorted(known)} are supported.")
    missing = sorted(known - set(d) - set(NUMERICS))  # older checkpoints lack NUMERICS: nanochat's defaults
    if missing:
        raise UserError(f"{where} lacks model settings {missing}; the checkpoint is incomplete.")
    bad = sorted(k for k, v in d.items()
                 if k not in NUMERICS and (not isinstance(v, int) or isinstance(v, bool) or v < 1))
    bad += [k for k, ok in (("norm_eps", norm_eps_ok(d.get("norm_eps"))),
                            ("rope_dtype", d.get("rope_dtype", "bfloat16") in ("bfloat16", "float32"))) if not ok]
    if bad:
        raise UserError(f"{where} has model settings {bad} that are out of range (sizes are positive integers, "
                        f"norm_eps null or a small positive number, rope_dtype bfloat16 or float32); the "
                        f"checkpoint is damaged.")
    return GPTConfig(**d)


def norm_eps_ok(eps):
    return eps is None or (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < 1)


def load_weights(model, sd, where):
    """load_state_dict with the failure modes turned into one sentence naming both shapes."""
    own = model.state_dict()
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if bad or missing or extra:
        raise UserError(f"{where} holds a model of shape ({describe_weights(sd)}) but the model "
                        f"being loaded is ({describe(model.config)}); load it with its own config."
                        + (f" (missing keys {missing[:3]}, unexpected {extra[:3]})" if missing or extra else ""))
    model.load_state_dict(sd, strict=True)


def check_same_shape(cfg_a, cfg_b, where):
    if any(getattr(cfg_a, k) != getattr(cfg_b, k) for k in SHAPE_FIELDS):
        raise UserError(f"{where} holds a model of shape ({describe(cfg_a)}) but the model being "
                        f"loaded is ({describe(cfg_b)}); build the model from the checkpoint's config.")


def _nanochat_steps(directory):
    if not os.path.isdir(directory):
        return []
    return sorted(int(m.group(1)) for f in os.listdir(directory) for m in [NANOCHAT_MODEL_RE.match(f)] if m)


def _nanochat_model_dir(path):
    """path if it holds model_XXXXXX.pt files, else its deepest d<N> folder that does, else None."""
    if _nanochat_steps(path):
        return path
    if not os.path.isdir(path):
        return None
    depths = sorted((int(m.group(1)), e) for e in os.listdir(path)
                    for m in [re.match(r"^d(\d+)$", e)] if m and _nanochat_steps(os.path.join(path, e)))
    return os.path.join(path, depths[-1][1]) if depths else None


def _find_nanochat_tokenizer(checkpoint_dir):
    """Beside the weights, in tokenizer/ beside or above them, or two levels up (nanochat's
    ~/.cache/nanochat/tokenizer above base_checkpoints/d20); None when there is none."""
    c = os.path.abspath(checkpoint_dir)
    for d in (c, os.path.join(c, "tokenizer"), os.path.join(os.path.dirname(c), "tokenizer"),
              os.path.join(os.path.dirname(os.path.dirname(c)), "tokenizer")):
        if os.path.isfile(os.path.join(d, "tokenizer.json")):
            return Tokenizer.load(d)
        if os.path.isfile(os.path.join(d, "tokenizer.pkl")):
            return Tokenizer.from_nanochat_pickle(os.path.join(d, "tokenizer.pkl"))
    return None


def load_nanochat(checkpoint_dir, device="cpu"):
    """(model, tokenizer or None, meta) of a nanochat (Oct 2025) checkpoint's highest step. Keys lose
    torch.compile's `_orig_mod.` prefix; bf16 tensors become fp32 (exact); gpt.py rebuilds the
    rotary tables in bf16 as nanochat does, so logits match nanochat's."""
    if not os.path.isdir(checkpoint_dir):
        raise UserError(f"nanochat checkpoint directory {checkpoint_dir} does not exist; check the path.")
    model_dir = _nanochat_model_dir(checkpoint_dir)
    if model_dir is None:
        raise UserError(f"{checkpoint_dir} has no nanochat model_XXXXXX.pt file; point at the folder "
                        f"holding model_*.pt and meta_*.json (e.g. base_checkpoints/d20).")
    checkpoint_dir, step = model_dir, _nanochat_steps(model_dir)[-1]
    meta_path = os.path.join(checkpoint_dir, f"meta_{step:06d}.json")
    meta = read_json(meta_path, fix="the checkpoint is incomplete or damaged, or the path is wrong")
    if "model_config" not in meta:
        raise UserError(f"{meta_path} has no model_config; it is not a nanochat checkpoint meta file.")
    cfg = config_from_dict(meta["model_config"], meta_path)
    model_path = os.path.join(checkpoint_dir, f"model_{step:06d}.pt")
    sd = {k.removeprefix("_orig_mod."): (v.float() if v.is_floating_point() else v)
          for k, v in read_torch(model_path).items()}
    model = GPT(cfg)
    load_weights(model, sd, model_path)
    tokenizer = _find_nanochat_tokenizer(checkpoint_dir)
    check_vocab(tokenizer, cfg, checkpoint_dir)
    meta = {**meta, "source": "nanochat", "step": step, "checkpoint": os.path.abspath(checkpoint_dir)}
    return model.to(device).eval(), tokenizer, meta


def check_vocab(tokenizer, cfg, where):
    """Ids past the model's embedding would crash much later (a padded vocabulary is fine)."""
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer found for {where} has {tokenizer.vocab_size} tokens but the model "
                        f"has vocab_size={cfg.vocab_size}; use the tokenizer the model was trained with.")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
HF_KEYS = [(r"^model\.embed_tokens\.", "transformer.wte."),
           (r"^model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.", r"transformer.h.\1.attn.c_\2."),
           (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"transformer.h.\1.attn.c_proj."),
           (r"^model\.layers\.(\d+)\.mlp\.fc1\.", r"transformer.h.\1.mlp.c_fc."),
           (r"^model\.layers\.(\d+)\.mlp\.fc2\.", r"transformer.h.\1.mlp.c_proj.")]


def read_safetensors(path):
    """{name: tensor} of a .safetensors file: u64 header size, JSON header, then the tensors' bytes."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
            start, out = 8 + n, {}
            for name, spec in header.items():
                if name == "__metadata__":
                    continue
                a, b = spec["data_offsets"]
                buf = torch.empty(b - a, dtype=torch.uint8)
                f.seek(start + a)
                if f.readinto(buf.numpy()) != b - a:
                    raise EOFError("truncated tensor data")
                out[name] = buf.view(SAFETENSORS_DTYPES[spec["dtype"]]).reshape(spec["shape"])
    except (OSError, ValueError, KeyError, TypeError, EOFError, struct.error, RuntimeError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({type(e).__name__}); "
                        f"re-download the model.") from None
    return out


def _hf_state_dict(directory):
    """The model's tensors under our names, in fp32, from model.safetensors or the shards its index names."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        shards = sorted(set(read_json(index, fix="re-download the model")["weight_map"].values()))
    elif os.path.isfile(os.path.join(directory, "model.safetensors")):
        shards = ["model.safetensors"]
    else:
        raise UserError(f"{directory} has config.json (model_type nanochat) but no model.safetensors; "
                        f"re-download the model.")
    sd = {}
    for shard in shards:
        for k, v in read_safetensors(os.path.join(directory, shard)).items():
            for pat, rep in HF_KEYS:
                k = re.sub(pat, rep, k)
            sd[k] = v.float() if v.is_floating_point() else v
    return sd


def hf_config(cfg, where):
    """GPTConfig from a transformers NanoChatConfig dict, honouring every field of its forward pass (tied
    embeddings: load_hf), refusing one our GPT cannot compute (attention_dropout acts in training only)."""
    n_embd, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    fixed = {"hidden_act": (cfg.get("hidden_act", "relu2"), "relu2"),
             "final_logit_softcapping": (cfg.get("final_logit_softcapping", SOFTCAP), SOFTCAP),
             "attention_bias": (cfg.get("attention_bias", False), False),
             "rope_theta": (rope.get("rope_theta", cfg.get("rope_theta", 10000.0)), 10000.0),
             "rope_type": (rope.get("rope_type", "default"), "default"),
             "intermediate_size": (cfg.get("intermediate_size", 4 * n_embd), 4 * n_embd),
             "head_dim": (cfg.get("head_dim") or n_embd // max(n_head, 1), n_embd // max(n_head, 1))}
    for k, (v, want) in fixed.items():
        if v != want:
            raise UserError(f"{where} sets {k}={v!r}, which nanostoney's GPT (nanochat's architecture) cannot "
                            f"compute (it needs {k}={want!r}); this model cannot be loaded exactly.")
    eps = cfg.get("rms_norm_eps", 1e-6)
    if min(n_head, n_kv) < 1 or n_embd % n_head or (n_embd // n_head) % 2 or n_head % n_kv or not norm_eps_ok(eps):
        raise UserError(f"{where} has hidden_size={n_embd}, num_attention_heads={n_head}, num_key_value_heads="
                        f"{n_kv}, rms_norm_eps={eps!r}: heads must split the width evenly into even head sizes, "
                        f"kv heads divide the heads, and the eps be a small positive number.")
    return GPTConfig(sequence_len=int(cfg.get("max_position_embeddings", 2048)), vocab_size=int(cfg["vocab_size"]),
                     n_layer=int(cfg["num_hidden_layers"]), n_head=n_head, n_kv_head=n_kv, n_embd=n_embd,
                     norm_eps=float(eps), rope_dtype="float32")


def load_hf(directory, device="cpu"):
    """A transformers NanoChat directory as (model, tokenizer or None, meta)."""
    where = os.path.join(directory, "config.json")
    raw = read_json(where, fix="re-download the model")
    try:
        cfg = hf_config(raw, where)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where} lacks or garbles the setting {e}; it is not a complete NanoChat config.") from None
    sd = _hf_state_dict(directory)
    if raw.get("tie_word_embeddings") and "transformer.wte.weight" in sd:  # transformers ties lm_head to it
        sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()  # ours is untied: a copy trains apart
    model = GPT(cfg)
    load_weights(model, sd, os.path.join(directory, "model.safetensors"))
    tokenizer = Tokenizer.load(directory) if os.path.isfile(os.path.join(directory, "tokenizer.json")) else None
    check_vocab(tokenizer, cfg, directory)
    meta = {"source": "transformers", "model_type": "nanochat", "checkpoint": os.path.abspath(directory)}
    return model.to(device).eval(), tokenizer, meta
