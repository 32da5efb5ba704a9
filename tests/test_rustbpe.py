"""The Rust BPE trainer against a plain Python BPE, across thread counts, and its own encoder
against the `tokenizers` one on all bundled text."""
import shutil
import subprocess
from pathlib import Path

import pytest
from tokenizers import Regex, pre_tokenizers

import nanostoney_rustbpe
from nanostoney.tokenizer import SPLIT_PATTERN, Tokenizer
from test_tokenizer import bundled_texts

REPO = Path(__file__).resolve().parent.parent

STONEY_CORPUS = """\
îchiyach yuṯẖach îchiyach îyâ ûne âba îchiyach, yuṯẖach! 'ṯ ẖ î â û
Hayis îchiyach yuṯẖach 2024 1999 12345 7 07 0.5 3/4 îyâ âba âba ûne
  îchiyach\tyuṯẖach\n\n   yuṯẖach  îchiyach's they'll we've I'M
1, 2, 3, 10, 20, 300, 4000 îchiyach yuṯẖach yuṯẖach yuṯẖach
"""


def reference_bpe(texts, num_merges, pattern=SPLIT_PATTERN):
    """Textbook byte-level BPE: split with `tokenizers`' regex engine (not ours), recount all
    pairs every step, take the most frequent (smallest pair of ids on ties), merge it left to
    right everywhere. Pairs that would spell an existing token's bytes are never taken."""
    split = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    counts = {}
    for t in texts:
        for piece, _ in split.pre_tokenize_str(t):
            counts[piece] = counts.get(piece, 0) + 1
    words = [[list(w.encode()), n] for w, n in counts.items()]
    spelled = {i: bytes([i]) for i in range(256)}
    merges = []
    for step in range(num_merges):
        pairs = {}
        for w, n in words:
            for p in zip(w, w[1:]):
                pairs[p] = pairs.get(p, 0) + n
        known = set(spelled.values())
        candidates = [p for p in pairs if spelled[p[0]] + spelled[p[1]] not in known]
        if not candidates:
            break
        best = max(candidates, key=lambda p: (pairs[p], -p[0], -p[1]))
        new = 256 + step
        spelled[new] = spelled[best[0]] + spelled[best[1]]
        merges.append(best)
        for item in words:
            w, out, i = item[0], [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            item[0] = out
    return merges


def train(texts, vocab_size, **kw):
    tok = nanostoney_rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, **kw)
    return tok


def test_merges_match_reference_bpe_on_stoney_text():
    texts = STONEY_CORPUS.splitlines(keepends=True)
    want = reference_bpe(texts, 200)
    assert 40 < len(want) < 200  # many merges, until no pair is left (both must stop there)
    tok = train(texts, 256 + 200, buffer_size=2)
    assert tok.get_merges() == want
    # diacritics became whole tokens, so the test covers multi-byte characters
    vocab = {b for b, _ in tok.get_mergeable_ranks()}
    assert "ṯẖ".encode() in vocab or "yuṯẖach".encode() in vocab or " yuṯẖach".encode() in vocab


def test_merges_match_reference_with_another_pattern():
    texts = STONEY_CORPUS.splitlines(keepends=True)
    pattern = r"\p{L}+|\p{N}|\s+|[^\s\p{L}\p{N}]+"  # no look-ahead: runs on the general regex path
    tok = train(texts, 256 + 50, pattern=pattern)
    assert tok.get_pattern() == pattern
    assert tok.get_merges() == reference_bpe(texts, 50, pattern)


def test_same_merges_for_any_thread_count_and_batching():
    texts = [t for t in bundled_texts()[:6000]]
    one = train(texts, 1024, num_threads=1, buffer_size=10_000)
    two = train(texts, 1024, num_threads=2, buffer_size=97)
    assert one.vocab_size == 1024
    assert one.get_merges() == two.get_merges()
    assert one.get_mergeable_ranks() == two.get_mergeable_ranks()


def test_mergeable_ranks_spell_the_merges():
    tok = train(STONEY_CORPUS.splitlines(), 300)
    ranks = tok.get_mergeable_ranks()
    assert [r for _, r in ranks] == list(range(300))
    assert all(ranks[i][0] == bytes([i]) for i in range(256))
    for i, (a, b) in enumerate(tok.get_merges()):
        assert ranks[256 + i][0] == ranks[a][0] + ranks[b][0]


def test_rust_encode_matches_tokenizers_on_all_bundled_text():
    texts = bundled_texts()
    tok = Tokenizer.train(texts, 2048)
    got = tok.encode_batch(texts)
    mismatched = [t for t, ids in zip(texts, got) if tok.rust.encode(t) != ids]
    assert not mismatched, mismatched[:3]


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        train(["abc"], 100)
    with pytest.raises(ValueError):
        train(["abc"], 300, pattern="(")
    with pytest.raises(TypeError):
        train([b"bytes are not text"], 300)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cargo") is None, reason="cargo not installed")
def test_cargo_test_passes():
    r = subprocess.run(["cargo", "test", "--quiet"], cwd=REPO / "rustbpe", capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
