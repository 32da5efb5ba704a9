"""The pretraining corpus: the text the base model and the tokenizer read.

pretraining_texts(): the Stoney conversations of the EXTRACTION groups (every fact a val/test
question asks about; no *_unseen control), `augment` renderings of each of their facts (Physics of
Language Models 3.1: augmentation decides whether a model answers about facts never asked about),
and the TRAIN split of `tasks` (3.1's "mixed training"). validation_texts(): for the val bpb.
"""
import argparse
import random

from nanostoney import cli
from nanostoney.tasks import TASK_NAMES, TASKS, get_task, sources_for_tasks
from nanostoney.tasks.base import stable_hash
from nanostoney.tasks.stoney_corpus import load_corpus

FACT_TEMPLATES = (
    "`{term}` means '{gloss}'.",
    "'{gloss}' in Stoney Nakoda is `{term}`.",
    "The Stoney Nakoda term `{term}` means '{gloss}' in English.",
    "To say '{gloss}' in Stoney Nakoda, use `{term}`.",
    "In English, `{term}` is '{gloss}'.",
    "The Stoney Nakoda word for '{gloss}' is `{term}`.",
    "`{term}` (Stoney Nakoda): {gloss}.",
    "A Stoney Nakoda speaker says `{term}` for '{gloss}'.",
)
PAGE = 8  # facts per glossary page
CORPUS_TASKS = ("arith_mc", "stoney_mc")
MAX_AUGMENT = 64
DEFAULT_AUGMENT = 16  # measured: 4 renderings did not store the held-out facts in 500 steps, 16 did
EXTRACTION = ("train", "val", "test")


def conversation_text(conv):
    return conv["user"] + "\n\n" + conv["assistant"]


def extraction_pairs():
    lexicon = load_corpus()["lexicon"]
    return [p for part in EXTRACTION for p in lexicon[part]]


def fact_pages(pairs, k):
    """K renderings of every pair, PAGE to a page; rendering r uses template (hash + r) mod len(FACT_TEMPLATES)."""
    pages = []
    for r in range(k):
        order = sorted(pairs, key=lambda p: stable_hash(f"fact-order/{r}/{p['term_key']}"))
        lines = [FACT_TEMPLATES[(stable_hash(p["term_key"]) + r) % len(FACT_TEMPLATES)].format(
            term=p["term"], gloss=p["gloss"]) for p in order]
        pages += ["\n".join(lines[i:i + PAGE]) for i in range(0, len(lines), PAGE)]
    return pages


def task_text(ex):
    return "\n\n".join(m["content"] for m in ex["messages"])


def augment_count(text):
    k = cli.nonneg_int(text)
    if k > MAX_AUGMENT:
        raise argparse.ArgumentTypeError(f"must be 0 (no fact renderings) to {MAX_AUGMENT}, got {text!r}")
    return k


def task_list(spec):
    """"arith_mc,gsm8k" -> ["arith_mc", "gsm8k"], each a known task that is not a control."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"names no task; e.g. {','.join(CORPUS_TASKS)}")
    for n in names:
        if n not in TASKS:
            raise argparse.ArgumentTypeError(f"unknown task {n!r}; valid tasks are {', '.join(TASK_NAMES)}")
        if TASKS[n].control:
            raise argparse.ArgumentTypeError(f"{n} is a control task, which no training text may hold; drop it")
    return names


def add_corpus_args(parser, augment=True):
    parser.add_argument("--corpus-tasks", type=task_list, default=",".join(CORPUS_TASKS),
                        help="tasks whose train split is pretraining text besides the Stoney conversations")
    if augment:
        parser.add_argument("--augment", type=augment_count, default=DEFAULT_AUGMENT,
                            help="renderings of each Stoney extraction fact in the pretraining text (0 = none)")


def pretraining_texts(augment=0, tasks=CORPUS_TASKS):
    convs = load_corpus()["convs"]
    texts = [conversation_text(c) for part in EXTRACTION for c in convs[part]]
    texts += fact_pages(extraction_pairs(), augment)
    texts += [task_text(ex) for name in tasks for ex in get_task(name).examples("train")]
    random.Random(0).shuffle(texts)  # families interleaved through the stream
    return texts


def validation_texts(tasks=CORPUS_TASKS):
    return ([conversation_text(c) for c in load_corpus()["convs"]["unseen_val"]]
            + [task_text(ex) for name in tasks for ex in get_task(name).examples("val")])


def pretraining_sources(tasks=CORPUS_TASKS):
    return sources_for_tasks(["stoney_qa", *tasks])
