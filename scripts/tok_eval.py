"""Compression of a tokenizer per kind of text: bytes of UTF-8 per token (higher = fewer tokens).

    python -m scripts.tok_eval                                   # out/tokenizer
    python -m scripts.tok_eval --tokenizer out/tokenizer --compare ~/.cache/nanochat/tokenizer

Families, all from the held-out (val + test) splits so the vocabulary never saw them:
  stoney_terms     Stoney Nakoda terms (stoney_lexicon, English -> Stoney answers)
  english_glosses  the English glosses of Stoney terms (stoney_lexicon, Stoney -> English answers)
  stoney_answers   the assistant answers of the Stoney conversations (bilingual prose)
  math             GSM8K and AQuA problems with their worked solutions
A Stoney term costing many more tokens per byte than its English gloss means the model sees it
in smaller pieces. `--compare` takes another tokenizer dir: ours, or nanochat's (tokenizer.pkl).
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
    n_bytes = sum(len(t.encode()) for t in texts)
    return n_bytes / max(n_tokens, 1), n_tokens / max(len(texts), 1)


def main(argv=None):
    p = cli.ArgumentParser(description="Tokenizer compression per text family.")
    p.add_argument("--tokenizer", default="out/tokenizer", help="tokenizer dir (scripts.tok_train output)")
    p.add_argument("--compare", default=None, help="another tokenizer dir to put beside it (ours or nanochat's)")
    p.add_argument("--splits", default="val,test", help="task splits to measure on, comma-separated")
    args = p.parse_args(argv)

    paths = [args.tokenizer] + ([args.compare] if args.compare else [])
    toks = [Tokenizer.load(path) for path in paths]
    fam = family_texts(args.splits.split(","))

    header = f"{'family':16s} {'texts':>6s}"
    for path, tok in zip(paths, toks):
        header += f" | {os.path.basename(os.path.normpath(path))[:16] + f' V={tok.vocab_size}':>25s}"
    print(header)
    print(f"{'':23s}" + " | bytes/token tokens/text" * len(toks))
    for family, texts in fam.items():
        row = f"{family:16s} {len(texts):6d}"
        for tok in toks:
            bpt, tpt = compression(tok, texts) if texts else (float("nan"), float("nan"))
            row += f" | {bpt:11.2f} {tpt:11.1f}"
        print(row)


if __name__ == "__main__":
    run_main(main)
