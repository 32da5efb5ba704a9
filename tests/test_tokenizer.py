"""nanostoney.tokenizer: round trips on all bundled text, chat rendering and its loss mask,
save/load, and reading a nanochat tokenizer.pkl without tiktoken."""
import json
import pickle
import sys
import types
from pathlib import Path

import pytest

from nanostoney.errors import UserError
from nanostoney.tokenizer import SPECIAL_TOKENS, Tokenizer, merges_from_ranks

DATA = Path(__file__).resolve().parent.parent / "data"
STONEY_CORPUS = "îchiyach yuṯẖach îchiyach îyâ ûne âba, yuṯẖach! 2024 1999 12345\n  îchiyach\tyuṯẖach's\n"


def bundled_texts():
    """Every text in the bundled data: Stoney chats, AQuA and GSM8K problems."""
    texts = []
    for line in open(DATA / "stoney/stoney_valid.jsonl", encoding="utf-8"):
        texts += [m["content"] for m in json.loads(line)["messages"]]
    for name in ("aqua_rat/dev.json", "aqua_rat/test.json"):
        for line in open(DATA / name, encoding="utf-8"):
            d = json.loads(line)
            texts += [d["question"], "\n".join(d["options"]), d["rationale"]]
    for name in ("gsm8k/train.jsonl", "gsm8k/test.jsonl"):
        for line in open(DATA / name, encoding="utf-8"):
            d = json.loads(line)
            texts += [d["question"], d["answer"]]
    return texts


@pytest.fixture(scope="module")
def texts():
    return bundled_texts()


@pytest.fixture(scope="module")
def tok(texts):
    return Tokenizer.train(texts, 1024)


CONV = {"messages": [
    {"role": "system", "content": "You are a Stoney-English assistant."},
    {"role": "user", "content": "What does îchiyach mean?"},
    {"role": "assistant", "content": "<think>recall</think>\nAnswer: yuṯẖach"},
    {"role": "user", "content": "And 12 + 30?"},
    {"role": "assistant", "content": "Answer: 42"},
]}


def test_vocab_layout(tok):
    assert tok.vocab_size == 1024
    assert [tok.token_id(s) for s in SPECIAL_TOKENS] == list(range(1024 - len(SPECIAL_TOKENS), 1024))
    assert tok.bos_id == tok.token_id("<|bos|>")
    assert tok.encode("A") == [ord("A")]  # ids 0..255 are the bytes
    with pytest.raises(UserError):
        tok.token_id("<|nope|>")


def test_decode_encode_round_trips_all_bundled_text(tok, texts):
    ids = tok.encode_batch(texts)
    assert sum(map(len, ids)) < sum(len(t.encode()) for t in texts) / 2  # it does compress
    assert tok.hf.decode_batch(ids, skip_special_tokens=False) == texts
    assert tok.decode(tok.encode(texts[0])) == texts[0]


def test_special_token_text_stays_text(tok):
    ids = tok.encode("say <|bos|> and <|assistant_end|>")
    assert not set(ids) & {tok.token_id(s) for s in SPECIAL_TOKENS}
    assert tok.decode(ids) == "say <|bos|> and <|assistant_end|>"


def test_render_conversation_masks_exactly_the_assistant_turns(tok):
    ids, mask = tok.render_conversation(CONV)
    assert len(ids) == len(mask) and ids[0] == tok.bos_id
    trained = [i for i, m in zip(ids, mask) if m]
    want = (tok.encode(CONV["messages"][2]["content"]) + [tok.token_id("<|assistant_end|>")]
            + tok.encode(CONV["messages"][4]["content"]) + [tok.token_id("<|assistant_end|>")])
    assert trained == want
    # the system message is folded into the first user turn, nothing of it is trained on
    text = tok.decode(ids)
    assert text.startswith("<|bos|><|user_start|>You are a Stoney-English assistant.\n\nWhat does îchiyach mean?<|user_end|>")
    assert text.count("<|assistant_start|>") == 2
    for i, m in zip(ids, mask):
        if i in (tok.token_id("<|assistant_start|>"), tok.token_id("<|user_end|>")):
            assert m == 0


def test_render_prompt_ends_ready_for_the_assistant(tok):
    prompt = tok.render_prompt(CONV)
    ids, _ = tok.render_conversation(CONV)
    assert prompt[-1] == tok.token_id("<|assistant_start|>")
    assert ids[:len(prompt)] == prompt  # the prompt is the conversation up to the last answer
    assert tok.render_prompt({"messages": CONV["messages"][:-1]}) == prompt


def test_bad_conversations_raise(tok):
    with pytest.raises(UserError):
        tok.render_conversation({"messages": [{"role": "assistant", "content": "hi"}]})
    with pytest.raises(UserError):
        tok.render_conversation({"messages": [{"role": "user", "content": ["parts"]}]})
    with pytest.raises(UserError):
        tok.render_prompt({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})


def test_region_spans_cover_the_region_text(tok):
    system, user = "Be brief.", "Question: what is îchiyach?\nA) one"
    rendered = system + "\n\n" + user
    q = rendered.index("what is îchiyach?")
    regions = {"system": (0, len(system)), "question": (q, q + len("what is îchiyach?"))}
    conv = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                         {"role": "assistant", "content": "A"}]}
    ids, mask, spans = tok.render_conversation_with_spans(conv, regions)
    assert (ids, mask) == tok.render_conversation(conv)
    a, b = spans["question"]
    assert "what is îchiyach?" in tok.decode(ids[a:b])
    assert "Question" not in tok.decode(ids[a:b])
    a, b = spans["system"]
    assert tok.decode(ids[a:b]).startswith(system)  # a token may run past the span's edge ('.\n\n')
    assert "Question" not in tok.decode(ids[a:b])
    assert [r for r, _, _ in spans["turns"]] == ["user", "assistant"]


def test_save_load_round_trip(tok, tmp_path, texts):
    tok.save(tmp_path / "tok")
    back = Tokenizer.load(tmp_path / "tok")
    assert back.vocab_size == tok.vocab_size and back.special_tokens == tok.special_tokens
    assert back.pattern == tok.pattern
    sample = texts[::50]
    assert back.encode_batch(sample) == tok.encode_batch(sample)
    assert back.render_conversation(CONV) == tok.render_conversation(CONV)
    assert back.encode("<|bos|>") == tok.encode("<|bos|>")  # specials in text stay text after load
    assert back.token_byte_lengths() == tok.token_byte_lengths()
    with pytest.raises(UserError):
        Tokenizer.load(tmp_path / "missing")


def test_token_byte_lengths(tok):
    lengths = tok.token_byte_lengths()
    assert lengths[:256] == [1] * 256
    assert all(lengths[tok.token_id(s)] == 0 for s in SPECIAL_TOKENS)
    ids = tok.encode("îchiyach yuṯẖach 2024")
    assert sum(lengths[i] for i in ids) == len("îchiyach yuṯẖach 2024".encode())


def test_vocab_too_large_for_corpus_or_too_small_raises():
    with pytest.raises(UserError):
        Tokenizer.train(["ab ab"], 2000)
    with pytest.raises(UserError):
        Tokenizer.train(["ab ab"], 260)


def test_merges_from_ranks_recovers_the_merges(tok):
    ranks = {b: r for b, r in tok.rust.get_mergeable_ranks()}
    spelled = [b for b, _ in tok.rust.get_mergeable_ranks()]
    assert merges_from_ranks(ranks) == [(spelled[a], spelled[b]) for a, b in tok.rust.get_merges()]


def _fake_nanochat_pickle(path, ranks, pattern, specials, monkeypatch):
    """Writes a pickle shaped like a tiktoken Encoding, without tiktoken installed."""
    class Encoding:
        def __getstate__(self):
            return {"name": "rustbpe", "pat_str": pattern, "mergeable_ranks": ranks, "special_tokens": specials}
    Encoding.__module__, Encoding.__qualname__ = "tiktoken.core", "Encoding"
    mod = types.ModuleType("tiktoken.core")
    mod.Encoding = Encoding
    monkeypatch.setitem(sys.modules, "tiktoken", types.ModuleType("tiktoken"))
    monkeypatch.setitem(sys.modules, "tiktoken.core", mod)
    path.write_bytes(pickle.dumps(Encoding()))
    monkeypatch.delitem(sys.modules, "tiktoken.core")
    monkeypatch.delitem(sys.modules, "tiktoken")


def test_from_nanochat_pickle_gives_the_same_ids(tok, tmp_path, monkeypatch, texts):
    ranks = {b: r for b, r in tok.rust.get_mergeable_ranks()}
    specials = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
    _fake_nanochat_pickle(tmp_path / "tokenizer.pkl", ranks, tok.pattern, specials, monkeypatch)
    nc = Tokenizer.load(tmp_path)  # a nanochat tokenizer dir holds tokenizer.pkl
    assert nc.vocab_size == tok.vocab_size
    assert [nc.token_id(s) for s in SPECIAL_TOKENS] == [tok.token_id(s) for s in SPECIAL_TOKENS]
    assert nc.encode_batch(texts[::20]) == tok.encode_batch(texts[::20])
    assert nc.render_conversation(CONV) == tok.render_conversation(CONV)


def test_from_nanochat_pickle_refuses_other_pickles(tmp_path):
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(types.SimpleNamespace(a=1)))
    with pytest.raises(UserError):
        Tokenizer.from_nanochat_pickle(tmp_path / "evil.pkl")
    with pytest.raises(UserError):
        Tokenizer.from_nanochat_pickle(tmp_path / "missing.pkl")


def test_train_on_stoney_text_keeps_diacritic_words_whole():
    tok = Tokenizer.train(STONEY_CORPUS.splitlines() * 3, 256 + 9 + 30)
    assert tok.decode(tok.encode(STONEY_CORPUS)) == STONEY_CORPUS
    assert len(tok.encode(" îchiyach")) == 1
