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

from sevjax.cli import classify_main

if __name__ == "__main__":
    sys.exit(classify_main())
