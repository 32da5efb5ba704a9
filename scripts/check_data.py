"""Check data before a run: the manifest, the governance gate, and that the tasks load.

    python -m scripts.check_data --manifest data/SOURCE_MANIFEST.yml --use training FILE...
    python -m scripts.check_data --tasks stoney_mc,gsm8k_mc            # gate + load + split sizes
    python -m scripts.check_data --manifest ../StoneyNakoda/SOURCE_MANIFEST.yml \\
        --use training ../StoneyNakoda/OpenAIFineTune/stoney_train.jsonl

Prints one "ok" line per approved source that exists and reads whole (and each task's split
sizes); any problem is one sentence on stderr and exit code 2. Writes nothing.
"""
from nanostoney import cli
from nanostoney.cli import run_main
from nanostoney.errors import UserError
from nanostoney.governance import add_manifest_arg, check_sources, load_manifest
from nanostoney.sources import check_readable
from nanostoney.tasks import get_task, sources_for_tasks
from nanostoney.tasks.base import SPLITS


def main(argv=None):
    p = cli.ArgumentParser(description="Validate a manifest and gate data sources.")
    p.add_argument("sources", nargs="*", help="data files (or hf://owner/name ids) to gate")
    add_manifest_arg(p)
    p.add_argument("--use", default="training", help="training, upload, public_release or publishing")
    p.add_argument("--tasks", default="", help="comma list of tasks: gate their sources and load their splits")
    p.add_argument("--source", default="bundled", help="task data source: bundled, hub or auto")
    p.add_argument("--data-dir", default=None, help="a directory laid out like data/ to read instead")
    args = p.parse_args(argv)
    for m in args.manifest or [None]:
        path, records = load_manifest(m)
        print(f"manifest {path}: {len(records)} records")
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    sources = list(args.sources) + sources_for_tasks(names, source=args.source, data_dir=args.data_dir)
    if not sources:
        raise UserError("nothing to check; name data files or pass --tasks.")
    for src, record in check_sources(sources, use=args.use, manifest=args.manifest):
        check_readable(src)
        print(f"ok: {src} may be used for {args.use} (record {record})")
    for name in names:
        task = get_task(name, source=args.source, data_dir=args.data_dir)
        print(f"{name}: " + "  ".join(f"{s}={len(task.examples(s))}" for s in SPLITS))


if __name__ == "__main__":
    run_main(main)
