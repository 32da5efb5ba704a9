"""Compression of a tokenizer per kind of text: bytes of UTF-8 per token (higher = fewer tokens).

    python -m scripts.tok_eval                                   # out/tokenizer
    python -m scripts.tok_eval --tokenizer out/tokenizer --compare ~/.cache/nanochat/tokenizer

Families from the held-out splits: stoney_terms and english_glosses (stoney_lexicon's answers),
stoney_answers (the Stoney conversations' assistant turns), math (GSM8K and AQuA with solutions).
`--compare` takes another tokenizer dir: ours, or nanochat's (tokenizer.pkl).
"""
import os

from nanostoney import cli
from nanostoney.cli import run_main
from nanostoney.tasks import get_task
from nanostoney.tokenizer import Tokenizer


def family_texts(splits):
    """{family: [texts]} from the tasks' held-out splits."""
    fam = {"stoney_terms": [], "english_glosses": [], "stoney_answers": [], "math": []}
    for split in splits:
        for ex in get_task("stoney_lexicon").examples(split):
            fam["stoney_terms" if ex.get("direction") == "e2s" else "english_glosses"].append(ex["answer"])
        for ex in get_task("stoney_qa").examples(split):
            fam["stoney_answers"] += [m["content"] for m in ex["messages"] if m["role"] == "assistant"]
        for name in ("gsm8k", "aqua_mc"):
            for ex in get_task(name).examples(split):
                fam["math"] += [m["content"] for m in ex["messages"] if m["role"] != "system"]
    return fam


def compression(tok, texts):
    """(bytes per token, tokens per text)."""
    n_tokens = sum(map(len, tok.encode_batch(texts)))
    return sum(len(t.encode()) for t in texts) / max(n_tokens, 1), n_tokens / max(len(texts), 1)


def main(argv=None):
    p = cli.ArgumentParser(description="Tokenizer compression per text family.")
    p.add_argument("--tokenizer", default="out/tokenizer", help="tokenizer dir (scripts.tok_train output)")
    p.add_argument("--compare", default=None, help="another tokenizer dir to put beside it (ours or nanochat's)")
    p.add_argument("--splits", default="val,test", help="task splits to measure on, comma-separated")
    args = p.parse_args(argv)

    paths = [args.tokenizer] + ([args.compare] if args.compare else [])
    toks = [Tokenizer.load(path) for path in paths]
    names = [os.path.basename(os.path.normpath(path))[:16] + f" V={tok.vocab_size}" for path, tok in zip(paths, toks)]
    print(f"{'family':16s} {'texts':>6s}" + "".join(f" | {name:>25s}" for name in names))
    print(f"{'':23s}" + " | bytes/token tokens/text" * len(toks))
    for family, texts in family_texts(args.splits.split(",")).items():
        scores = [compression(tok, texts) if texts else (float("nan"), float("nan")) for tok in toks]
        print(f"{family:16s} {len(texts):6d}" + "".join(f" | {bpt:11.2f} {tpt:11.1f}" for bpt, tpt in scores))


if __name__ == "__main__":
    run_main(main)
