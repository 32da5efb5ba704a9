"""The engine: cached decoding equals uncached, sampling is seeded and restricted as asked,
rows stop on their own, log-probs are the plain model's."""
import pytest
import torch

from nanostoney.engine import Engine, sample_next
from nanostoney.errors import UserError
from nanostoney.gpt import GPT, GPTConfig

PROMPTS = [[1, 5, 7], [1, 9, 9, 9, 9, 2, 4], [1], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 5, 8]]


def tiny(n_kv_head=2, seed=0):
    torch.manual_seed(seed)
    cfg = GPTConfig(sequence_len=32, vocab_size=53, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_cached_greedy_equals_uncached(n_kv_head):
    engine = Engine(tiny(n_kv_head), stop_ids=[])
    a = engine.generate(PROMPTS, 16, temperature=0, num_samples=2)
    b = engine.generate(PROMPTS, 16, temperature=0, num_samples=2, use_cache=False)
    assert a.tokens == b.tokens
    assert len(a.tokens) == 10 and all(len(t) == 16 for t in a.tokens)
    assert a.tokens[0] == a.tokens[1] and a.tokens[0] != a.tokens[6]  # greedy samples agree
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-4)
    assert a.prompt_index == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_cached_sampling_equals_uncached():
    engine = Engine(tiny(), stop_ids=[])
    a = engine.generate(PROMPTS, 12, temperature=1.0, seed=5, num_samples=3)
    b = engine.generate(PROMPTS, 12, temperature=1.0, seed=5, num_samples=3, use_cache=False)
    assert a.tokens == b.tokens


def test_batched_equals_one_prompt_at_a_time():
    engine = Engine(tiny(), stop_ids=[])
    batched = engine.generate(PROMPTS, 10, temperature=0)
    for i, p in enumerate(PROMPTS):
        assert engine.generate([p], 10, temperature=0).tokens[0] == batched.tokens[i]


def test_logprobs_are_the_plain_model_at_temperature_one():
    model = tiny()
    engine = Engine(model, stop_ids=[])
    out = engine.generate(PROMPTS[:2], 8, temperature=0.7, top_k=5, seed=1)
    for r, prompt in enumerate(PROMPTS[:2]):
        seq = torch.tensor(prompt + out.tokens[r])[None]
        logp = torch.log_softmax(model(seq)[0, len(prompt) - 1:-1], -1)
        ref = logp.gather(-1, seq[0, len(prompt):, None]).squeeze(-1)
        assert torch.allclose(out.logprobs[r, :len(out.tokens[r])], ref, atol=1e-4)


def test_seed_reproduces_sampling():
    engine = Engine(tiny(), stop_ids=[])
    a = engine.generate(PROMPTS, 12, temperature=1.0, seed=7, num_samples=2)
    b = engine.generate(PROMPTS, 12, temperature=1.0, seed=7, num_samples=2)
    c = engine.generate(PROMPTS, 12, temperature=1.0, seed=8, num_samples=2)
    assert a.tokens == b.tokens and torch.equal(a.logprobs, b.logprobs)
    assert a.tokens != c.tokens
    assert a.tokens[0] != a.tokens[1]  # samples of one prompt differ


def test_top_k_and_top_p_restrict_the_support():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.log(probs).expand(4000, 4).contiguous()
    g = torch.Generator().manual_seed(0)

    def support(**kw):
        return set(sample_next(logits, generator=g, **kw).tolist())

    assert support() == {0, 1, 2, 3}
    assert support(top_k=2) == {0, 1}
    assert support(top_k=1) == {0}
    assert support(top_p=0.5) == {0}
    assert support(top_p=0.7) == {0, 1}
    assert support(top_p=0.81) == {0, 1, 2}
    assert support(top_k=3, top_p=0.99) == {0, 1, 2}
    assert support(temperature=0) == {0}
    # top_k=1 sampling in the engine is greedy
    engine = Engine(tiny(), stop_ids=[])
    assert engine.generate(PROMPTS, 6, top_k=1, seed=3).tokens == engine.generate(PROMPTS, 6, temperature=0).tokens


def test_rows_stop_on_their_own():
    engine = Engine(tiny(), stop_ids=[])
    free = engine.generate(PROMPTS, 12, temperature=0)
    stop = free.tokens[0][3]
    out = engine.generate(PROMPTS, 12, temperature=0, stop_ids=[stop])
    for r, toks in enumerate(free.tokens):
        n = toks.index(stop) + 1 if stop in toks else len(toks)
        assert out.tokens[r] == toks[:n]  # stop token included, nothing after it
        assert out.stopped[r] == (stop in toks)
        assert out.mask[r].sum() == n and out.mask[r, :n].all()
        assert (out.ids[r, n:] == 0).all() and (out.logprobs[r, n:] == 0).all()
        assert out.ids[r, :n].tolist() == out.tokens[r]
    assert out.ids.shape[1] == max(len(t) for t in out.tokens)


def test_stop_tokens_from_tokenizer():
    class Tok:
        def token_id(self, name):
            return {"<|assistant_end|>": 7, "<|bos|>": 1}[name]

    assert Engine(tiny(), Tok()).stop_ids == [7, 1]


def test_all_rows_stopped_ends_early():
    engine = Engine(tiny(), stop_ids=list(range(53)))  # every token stops
    out = engine.generate(PROMPTS, 10, temperature=0)
    assert all(len(t) == 1 for t in out.tokens) and out.ids.shape == (5, 1) and all(out.stopped)


def test_bad_requests():
    engine = Engine(tiny(), stop_ids=[])
    with pytest.raises(UserError, match="rotary positions"):
        engine.generate([[1] * 300], 30)
    with pytest.raises(UserError, match="empty prompt"):
        engine.generate([[]], 3)
