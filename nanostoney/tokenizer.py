"""Tokenizer: trained by our Rust BPE (rustbpe/), run by Hugging Face `tokenizers` with the same ids.

Byte-level BPE over chunks cut by nanochat's GPT-4-style regex (numbers in groups of at most two
digits). Ids: the 256 bytes, one per merge in the order learned, then nanochat's special tokens in
nanochat's order (so a nanochat tokenizer maps one to one); `vocab_size` includes the specials.
Chats are rendered like nanochat's, a system message prepended to the first user turn; the loss
mask is 1 exactly on the assistant's content and its `<|assistant_end|>`.
"""
import hashlib
import json
import os
import pickle

from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from nanostoney.errors import UserError
from nanostoney.files import read_json, write_json, write_text

SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

SPECIAL_TOKENS = [  # nanochat's; the python and output tokens are its tool use, unused here, kept for id parity
    "<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>",
]
SYSTEM_JOIN = "\n\n"  # system message + this + first user message (nanostoney.tasks uses the same)
META_FILE = "tokenizer_meta.json"


def bytes_to_unicode():
    """GPT-2's reversible map from bytes to the printable characters `tokenizers`' ByteLevel stores them as."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(shifted)) for b in range(256)}


def merges_from_ranks(ranks):
    """Each token's merge (left bytes, right bytes) from tiktoken-style ranks: BPE the token's
    bytes with only the merges ranked below it; the two parts left are what it was made from."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while pairs := [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:]))
                        if ranks.get(a + b, rank) < rank]:
            i = min(pairs)[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise UserError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens; "
                            "these are not byte-level BPE ranks")
        merges.append((parts[0], parts[1]))
    return merges


def build_hf_tokenizer(token_bytes, merges, pattern, special_tokens):
    """A `tokenizers` byte-level BPE with ids 0..len(token_bytes)-1 as given, merges in rank order,
    then the special tokens; the split regex runs first, then ByteLevel's byte mapping alone."""
    char = bytes_to_unicode()
    as_str = lambda b: "".join(char[x] for x in b)
    vocab = {as_str(t): i for i, t in enumerate(token_bytes)}
    if len(vocab) != len(token_bytes):
        raise UserError("two token ids have the same bytes; the vocabulary cannot be converted")
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[(as_str(a), as_str(b)) for a, b in merges],
                                fuse_unk=False, byte_fallback=False, ignore_merges=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(list(special_tokens))
    return hf


class Tokenizer:
    def __init__(self, hf, pattern=SPLIT_PATTERN, special_tokens=SPECIAL_TOKENS):
        self.hf = hf
        # Text that merely contains "<|bos|>" must stay text; only the renderers insert specials.
        self.hf.encode_special_tokens = True
        self.pattern = pattern
        self.special_tokens = list(special_tokens)
        self._special_ids = {s: hf.token_to_id(s) for s in self.special_tokens}

    @classmethod
    def train(cls, texts, vocab_size, pattern=SPLIT_PATTERN, num_threads=None, buffer_size=8192):
        """Trains on an iterable of strings. `vocab_size` counts everything: 256 bytes, the
        merges, and the special tokens. The trainer holds `buffer_size` strings at a time."""
        import nanostoney_rustbpe  # lazy: the compiled trainer is needed to train, not to load
        num_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
        if num_merges < 0:
            raise UserError(f"vocab_size {vocab_size} is too small: it must be at least "
                            f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
        rust = nanostoney_rustbpe.Tokenizer()
        try:
            rust.train_from_iterator(iter(texts), 256 + num_merges, buffer_size=buffer_size, pattern=pattern,
                                     num_threads=num_threads)
        except ValueError as e:  # a pattern the regex engine rejects
            raise UserError(f"tokenizer training failed: {e}") from e
        if rust.vocab_size < 256 + num_merges:
            raise UserError(f"the training text only supports {rust.vocab_size - 256} merges, fewer than the "
                            f"{num_merges} that vocab_size {vocab_size} needs; lower --vocab-size or add text")
        token_bytes = [b for b, _ in sorted(rust.get_mergeable_ranks(), key=lambda x: x[1])]
        merges = [(token_bytes[a], token_bytes[b]) for a, b in rust.get_merges()]
        tok = cls(build_hf_tokenizer(token_bytes, merges, rust.get_pattern(), SPECIAL_TOKENS), rust.get_pattern())
        tok.rust = rust  # kept for tests that compare the two encoders
        return tok

    @classmethod
    def from_mergeable_ranks(cls, ranks, pattern, special_tokens):
        """From tiktoken-style {token bytes: id} and {special string: id}, specials after the ranks."""
        n = len(ranks)
        if sorted(ranks.values()) != list(range(n)):
            raise UserError("mergeable ranks must be the ids 0..N-1 without gaps")
        specials = sorted(special_tokens, key=special_tokens.get)
        if [special_tokens[s] for s in specials] != list(range(n, n + len(specials))):
            raise UserError("special token ids must follow the mergeable ranks without gaps")
        token_bytes = sorted(ranks, key=ranks.get)
        hf = build_hf_tokenizer(token_bytes, merges_from_ranks(ranks), pattern, specials)
        return cls(hf, pattern, specials)

    @classmethod
    def from_nanochat_pickle(cls, path):
        """From nanochat's tokenizer.pkl: the pickled tiktoken Encoding's arguments, read without tiktoken."""
        if not os.path.isfile(path):
            raise UserError(f"no nanochat tokenizer at {path}; pass the tokenizer.pkl from nanochat's tokenizer dir")
        with open(path, "rb") as f:
            try:
                state = _EncodingUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError) as e:
                raise UserError(f"{path} is not a pickled tiktoken Encoding ({e})") from e
        state = getattr(state, "state", None)
        if isinstance(state, str):  # a registered encoding pickled by name, e.g. "cl100k_base"
            try:
                import tiktoken  # lazy: an optional extra, only for nanochat's pickled encodings
            except ImportError:
                raise UserError(f"{path} names the tiktoken encoding {state!r}; pip install tiktoken to load it") from None
            enc = tiktoken.get_encoding(state)
            state = {"pat_str": enc._pat_str, "mergeable_ranks": enc._mergeable_ranks, "special_tokens": enc._special_tokens}
        if not isinstance(state, dict) or "mergeable_ranks" not in state:
            raise UserError(f"{path} is not a pickled tiktoken Encoding; pip install tiktoken and check the file")
        return cls.from_mergeable_ranks(state["mergeable_ranks"], state["pat_str"], state["special_tokens"])

    @classmethod
    def load(cls, path):
        """From a directory written by `save`, or a nanochat tokenizer dir (tokenizer.pkl)."""
        tj, meta_path = os.path.join(path, "tokenizer.json"), os.path.join(path, META_FILE)
        if not os.path.isfile(tj):
            if os.path.isfile(os.path.join(path, "tokenizer.pkl")):
                return cls.from_nanochat_pickle(os.path.join(path, "tokenizer.pkl"))
            raise UserError(f"no tokenizer in {path}: expected tokenizer.json (train one with python -m scripts.tok_train)")
        meta = read_json(meta_path, fix="re-save the tokenizer") if os.path.isfile(meta_path) else {}
        try:
            hf = HFTokenizer.from_file(tj)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise UserError(f"{tj} is not a valid tokenizers file ({e})") from e
        return cls(hf, meta.get("pattern", SPLIT_PATTERN), meta.get("special_tokens", SPECIAL_TOKENS))

    def save(self, path):
        """Writes tokenizer.json and tokenizer_meta.json into `path`, each atomically."""
        write_text(os.path.join(path, "tokenizer.json"), self.hf.to_str(pretty=True))
        write_json(os.path.join(path, META_FILE), {"pattern": self.pattern, "special_tokens": self.special_tokens,
                                                   "vocab_size": self.vocab_size})

    def fingerprint(self):
        """sha256 of the vocabulary, merges, split pattern and special tokens (a resume compares it)."""
        model = json.loads(self.hf.to_str())["model"]
        text = json.dumps([model.get("vocab"), model.get("merges"), self.pattern, self.special_tokens],
                          sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @property
    def vocab_size(self):
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self):
        return self.token_id("<|bos|>")

    def has_special(self, name):
        return self._special_ids.get(name) is not None

    def token_id(self, name):
        if self._special_ids.get(name) is None:
            raise UserError(f"{name!r} is not a special token of this tokenizer; it has {self.special_tokens}")
        return self._special_ids[name]

    def encode(self, text):
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts):
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids):
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_byte_lengths(self):
        """Bytes of text each id stands for (0 for special tokens): for bits-per-byte."""
        byte_chars, special = set(bytes_to_unicode().values()), set(self._special_ids.values())
        out = [0] * self.vocab_size
        for s, i in self.hf.get_vocab(with_added_tokens=True).items():
            if i not in special:
                out[i] = len(s) if set(s) <= byte_chars else len(s.encode())
        return out

    def _turns(self, conversation):
        """Messages with the system message folded into the first user turn, checked to alternate."""
        messages = conversation["messages"] if isinstance(conversation, dict) else conversation
        messages = [dict(m) for m in messages]
        if messages and messages[0].get("role") == "system":
            if len(messages) < 2 or messages[1].get("role") != "user":
                raise UserError("a system message must be followed by a user message")
            messages[1]["content"] = messages[0]["content"] + SYSTEM_JOIN + messages[1]["content"]
            messages = messages[1:]
        for i, m in enumerate(messages):
            want = "user" if i % 2 == 0 else "assistant"
            if m.get("role") != want:
                raise UserError(f"message {i} has role {m.get('role')!r}, expected {want!r}: "
                                "conversations alternate user and assistant, after an optional system message")
            if not isinstance(m.get("content"), str):
                raise UserError(f"message {i} content must be a string")
        return messages

    def render_conversation(self, conversation):
        """(ids, mask) for training; mask is 1 on assistant content and `<|assistant_end|>`."""
        return self.render_conversation_with_spans(conversation)[:2]

    def render_conversation_with_spans(self, conversation, regions=None):
        """(ids, mask, spans): spans["turns"] the (role, start, end) token range of each turn's content,
        spans[name] the tokens overlapping each of `regions` ({name: (char_start, char_end)} in the
        first user turn's text, system message included)."""
        ids, mask, spans = [self.bos_id], [0], {"turns": []}
        for i, m in enumerate(self._turns(conversation)):  # roles checked: user, assistant, user, ...
            ids.append(self.token_id(f"<|{m['role']}_start|>"))
            mask.append(0)
            if i == 0 and regions:
                enc = self.hf.encode(m["content"], add_special_tokens=False)
                content, offsets = enc.ids, enc.offsets
                for name, (a, b) in regions.items():
                    hit = [j for j, (s, e) in enumerate(offsets) if s < b and e > a]
                    if hit:
                        spans[name] = (len(ids) + hit[0], len(ids) + hit[-1] + 1)
            else:
                content = self.encode(m["content"])
            spans["turns"].append((m["role"], len(ids), len(ids) + len(content)))
            ids += content + [self.token_id(f"<|{m['role']}_end|>")]
            mask += [int(m["role"] == "assistant")] * (len(content) + 1)
        return ids, mask, spans

    def render_prompt(self, conversation):
        """Ids to generate the next assistant turn from: no final assistant message, then <|assistant_start|>."""
        messages = conversation["messages"] if isinstance(conversation, dict) else conversation
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        if len(self._turns(messages)) % 2 == 0:  # turns alternate from user: odd = ends with user
            raise UserError("a prompt must end with a user message")
        ids, _ = self.render_conversation({"messages": messages})
        return ids + [self.token_id("<|assistant_start|>")]


class _EncodingState:
    """Stands in for tiktoken's Encoding while unpickling; keeps the state it was given."""

    def __setstate__(self, state):
        self.state = state


class _EncodingUnpickler(pickle.Unpickler):
    """Unpickles a tiktoken Encoding without tiktoken, and refuses any other class, so loading
    a downloaded pickle cannot run arbitrary code."""

    def find_class(self, module, name):
        if module.split(".")[0] == "tiktoken" and name == "Encoding":
            return _EncodingState
        if (module, name) in (("copyreg", "_reconstructor"), ("builtins", "object")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected class {module}.{name}")
