r"""Severity classifier for Arabic medical complaints: train, evaluate, annotate.

Usage:
    python classify.py train                      # tiny BERT on the embedded set, 1-2 min, 2 CPUs
    python classify.py evaluate                   # metrics + reliability diagram in runs/classify
    python classify.py annotate                   # -> runs/classify/annotated.jsonl
    python classify.py annotate --set data.path=maqa.csv --set data.columns.complaint=question \
        --set data.columns.response=answer --set output=maqa_sev.parquet
    python classify.py train --config configs/classify.yaml \
        --set model.name_or_path=aubmindlab/bert-base-arabertv02 --set optim.lr=3e-5
"""

import sys

from sevjax.classify import ClassifyConfig, annotate, evaluate, run
from sevjax.config import parse_cli

COMMANDS = {"train": run, "evaluate": evaluate, "annotate": annotate}


def main(argv: list[str] | None = None) -> int:
    """``classify.py COMMAND [--config PATH] [--set key=value ...]``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: classify.py {{{','.join(COMMANDS)}}} [--config PATH] [--set KEY=VALUE]")
        return 2
    try:
        cfg = parse_cli(ClassifyConfig, argv[1:])
    except (ValueError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        COMMANDS[argv[0]](cfg)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
