"""The pretraining corpus: the text the base model and the tokenizer read.

Default, pretraining_texts():
- Stoney: every conversation of the EXTRACTION groups (the train, val and test parts of
  tasks/stoney_corpus.py; user and assistant turns, without the fixed system message), so every fact
  a Stoney val/test question asks about was read in pretraining. The control groups (the
  *_unseen tasks) are in no text here.
- augment=K: also K renderings of each extraction pair (term <-> gloss) in varied sentence
  templates (FACT_TEMPLATES), as glossary pages of PAGE facts, each rendering in another order.
  Physics of Language Models 3.1 found that such augmentation decides whether a model that
  read facts can answer questions about facts it was never asked about.
- tasks (default CORPUS_TASKS = arith_mc, stoney_mc): the TRAIN split of these tasks as text
  (question, options, rationale, answer): the arith train problems, and questions about the
  train terms only. This is Part 3.1's "mixed training": questions about some facts in the
  pretraining text teach the model to answer from what it read, and the held-out terms are
  never asked. (LoRA SFT alone, from a base that had never seen a question, did not learn to
  copy a term or map a value to its letter in 300 steps: docs/science_log.md.) Add gsm8k,
  aqua_mc for larger models; `arith` alone gives the corpus without questions.

validation_texts() is held-out text for the base model's val bpb: the val split of the same
tasks and the conversations of the unseen_val control groups (read without a gradient, so
they stay unseen). pretraining_sources() names what the governance gate checks.
"""
import argparse
import random

from nanostoney import cli
from nanostoney.errors import UserError
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
    """K renderings of every pair, PAGE to a page: rendering r of a pair uses template
    (hash + r) mod len(FACT_TEMPLATES), so K <= 8 renderings are K different sentences."""
    pages = []
    for r in range(k):
        order = sorted(pairs, key=lambda p: stable_hash(f"fact-order/{r}/{p['term_key']}"))
        lines = [FACT_TEMPLATES[(stable_hash(p["term_key"]) + r) % len(FACT_TEMPLATES)].format(
            term=p["term"], gloss=p["gloss"]) for p in order]
        pages += ["\n".join(lines[i:i + PAGE]) for i in range(0, len(lines), PAGE)]
    return pages


def task_text(ex):
    """A task example as plain text: its turns joined by blank lines."""
    return "\n\n".join(m["content"] for m in ex["messages"])


def check_augment(k):
    if not 0 <= k <= MAX_AUGMENT:
        raise UserError(f"--augment {k} is out of range; use 0 (no fact renderings) to {MAX_AUGMENT}.")


def augment_count(text):
    """--augment: renderings of each extraction fact, 0..MAX_AUGMENT."""
    k = cli.nonneg_int(text)
    if k > MAX_AUGMENT:
        raise argparse.ArgumentTypeError(f"must be 0 (no fact renderings) to {MAX_AUGMENT}, got {text!r}")
    return k


def task_list(spec):
    """--corpus-tasks: "arith_mc,gsm8k" -> ["arith_mc", "gsm8k"], each a known task that may be
    training text (a control task may not)."""
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
    """--corpus-tasks (and --augment), shared by base_train and tok_train."""
    parser.add_argument("--corpus-tasks", type=task_list, default=",".join(CORPUS_TASKS),
                        help="tasks whose train split is pretraining text besides the Stoney conversations")
    if augment:
        parser.add_argument("--augment", type=augment_count, default=DEFAULT_AUGMENT,
                            help="renderings of each Stoney extraction fact in the pretraining text (0 = none)")


def pretraining_texts(augment=0, tasks=CORPUS_TASKS):
    """The documents of the default pretraining corpus (see the module docstring)."""
    check_augment(augment)
    convs = load_corpus()["convs"]
    texts = [conversation_text(c) for part in EXTRACTION for c in convs[part]]
    texts += fact_pages(extraction_pairs(), augment)
    for name in tasks:
        texts += [task_text(ex) for ex in get_task(name).examples("train")]
    random.Random(0).shuffle(texts)  # families interleaved through the stream
    return texts


def validation_texts(tasks=CORPUS_TASKS):
    texts = [conversation_text(c) for c in load_corpus()["convs"]["unseen_val"]]
    for name in tasks:
        texts += [task_text(ex) for ex in get_task(name).examples("val")]
    return texts


def pretraining_sources(tasks=CORPUS_TASKS):
    return sources_for_tasks(["stoney_qa", *tasks])
