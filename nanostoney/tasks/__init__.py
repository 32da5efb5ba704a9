"""Tasks: conversations with verifiers, one file per family.

    task = get_task("stoney_mc")             # or source="hub" / "auto", data_dir=...
    ex = task.examples("train")[0]           # {"id", "source_id", "messages", "answer", "regions", "choices"?}
    task.prompt(ex)                          # messages without the gold assistant turn
    task.reward(ex, completion)              # float in [0, 1]; task.evaluate(ex, completion): bool
Splits are deterministic and disjoint by *source*. `python -m nanostoney.tasks` shows each task.
"""
from nanostoney.sources import SOURCES
from nanostoney.errors import UserError
from nanostoney.tasks.aqua import AquaMC
from nanostoney.tasks.arith import Arith, ArithMC
from nanostoney.tasks.gsm8k import GSM8K, GSM8KMC
from nanostoney.tasks.mmlu import MMLUEnglish, MMLUYoruba
from nanostoney.tasks.stoney import (StoneyLexicon, StoneyLexiconUnseen, StoneyMC, StoneyMCUnseen, StoneyQA,
                                     StoneyQAUnseen)
from nanostoney.tasks.stoney_verb import StoneyVerb, StoneyVerbUnseen

TASKS = {cls.name: cls for cls in (StoneyQA, StoneyLexicon, StoneyMC, StoneyVerb, AquaMC, GSM8K, GSM8KMC, Arith,
                                  ArithMC, StoneyQAUnseen, StoneyLexiconUnseen, StoneyMCUnseen, StoneyVerbUnseen,
                                  MMLUYoruba, MMLUEnglish)}
TASK_NAMES = tuple(TASKS)
# the tasks that read no network (MMLU's are read from a local copy or the hub)
BUNDLED_TASKS = tuple(n for n in TASK_NAMES if not n.startswith("mmlu_"))
_BUILT = {}


def get_task(name, source="bundled", data_dir=None):
    """The task called `name`, cached; source "bundled" (data/), "hub" or "auto" (hub if reachable)."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; valid tasks are {', '.join(TASK_NAMES)}.")
    if source not in SOURCES:
        raise UserError(f"unknown data source {source!r}; use one of {', '.join(SOURCES)}.")
    key = (name, source, str(data_dir) if data_dir else None)
    if key not in _BUILT:
        _BUILT[key] = TASKS[name](source=source, data_dir=data_dir)
    return _BUILT[key]


def sources_for_tasks(task_names, source="bundled", data_dir=None):
    """The source files (or hf:// ids) behind the tasks: derived data inherits its source's status."""
    return list(dict.fromkeys(s for name in task_names for s in get_task(name, source, data_dir).sources()))

