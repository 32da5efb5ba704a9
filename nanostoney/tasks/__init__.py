"""Tasks: conversations with verifiers, one file per family (stoney.py, aqua.py, gsm8k.py).

    task = get_task("stoney_mc")             # or source="hub" / "auto", data_dir=...
    ex = task.examples("train")[0]           # {"id", "source_id", "messages", "answer", "regions", "choices"?}
    task.prompt(ex)                          # messages without the gold assistant turn
    task.reward(ex, completion)              # float in [0, 1]
    task.evaluate(ex, completion)            # bool

Every gold assistant turn reads "<think>{reasoning}</think>\\nAnswer: {answer}" (stoney_qa keeps
the original assistant text: it is the chrF reference). Splits are deterministic and
disjoint by *source* (conversation or problem). `python -m nanostoney.tasks` prints split
sizes and an example per task; `--baselines` prints the surface-cue baselines of the MC tasks.
"""
from nanostoney.data import SOURCES
from nanostoney.errors import UserError
from nanostoney.tasks.base import SPLITS, Task, answer_after, baselines  # noqa: F401

TASK_NAMES = ("stoney_qa", "stoney_lexicon", "stoney_mc", "aqua_mc", "gsm8k", "gsm8k_mc")
_TASKS = {}


def _registry():
    from nanostoney.tasks.aqua import AquaMC
    from nanostoney.tasks.gsm8k import GSM8K, GSM8KMC
    from nanostoney.tasks.stoney import StoneyLexicon, StoneyMC, StoneyQA
    return {cls.name: cls for cls in (StoneyQA, StoneyLexicon, StoneyMC, AquaMC, GSM8K, GSM8KMC)}


def get_task(name, source="bundled", data_dir=None):
    """The task called `name`. source: "bundled" (default, the files under data/), "hub" (the
    hub's training pool, an error if unreachable) or "auto" (hub if reachable, else bundled,
    with a one-line note). data_dir: a directory laid out like data/ to read instead.
    Tasks are cached per process, so examples are built once."""
    if name not in TASK_NAMES:
        raise UserError(f"unknown task {name!r}; valid tasks are {', '.join(TASK_NAMES)}.")
    if source not in SOURCES:
        raise UserError(f"unknown data source {source!r}; use one of {', '.join(SOURCES)}.")
    key = (name, source, str(data_dir) if data_dir else None)
    if key not in _TASKS:
        _TASKS[key] = _registry()[name](source=source, data_dir=data_dir)
    return _TASKS[key]


def extract_answer(completion):
    """The text after the last "Answer:" in a completion, stripped; None if there is none."""
    return answer_after(completion)
