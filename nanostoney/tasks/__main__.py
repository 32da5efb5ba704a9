"""python -m nanostoney.tasks [--baselines] [--source bundled|hub|auto] [--task NAME ...]

Each task's split sizes and one example; --baselines: the MC tasks' surface-cue baselines (near chance)."""
import argparse

from nanostoney.cli import run_main
from nanostoney.tasks import BUNDLED_TASKS, get_task
from nanostoney.tasks.base import SPLITS, baselines
from nanostoney.tasks.mmlu import check_alignment


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", nargs="*", default=list(BUNDLED_TASKS),
                        help="tasks to show (default: every bundled one)")
    parser.add_argument("--source", default="bundled", help="bundled (default), hub, or auto")
    parser.add_argument("--baselines", action="store_true", help="print surface-cue baselines of the MC tasks")
    args = parser.parse_args()
    for name in args.task:
        task = get_task(name, source=args.source)
        sizes = {split: len(task.splits()[split]) for split in SPLITS}
        print(f"== {name} ({task.family}, {task.kind})  " + "  ".join(f"{s}={n}" for s, n in sizes.items())
              + f"  sources: {', '.join(task.sources())}")
        if args.baselines:
            for split in [s for s in SPLITS if sizes[s] and task.kind == "mc"]:
                b = baselines(task.examples(split), train=task.splits()["train"])
                print(f"   {split:5s} " + "  ".join(f"{k}={v:.1%}" for k, v in b.items()))
            continue
        ex = task.examples("val" if task.control else "train")[0]
        for m in ex["messages"]:
            print(f"--- {m['role']}\n{m['content']}")
        print(f"--- answer: {ex['answer']!r}   regions: {ex['regions']}\n")
    if {"mmlu_yo", "mmlu_en"} <= set(args.task):  # the two languages must hold the same questions
        print(f"mmlu_yo / mmlu_en alignment (same gold letter on shared ids): {check_alignment(args.source):.1%}")


if __name__ == "__main__":
    run_main(main)
