"""Severity-aware fine-tuning of an Arabic medical language model.

Usage:
    python train.py                                       # tiny default: configs/tiny.yaml values
    python train.py --config configs/aragpt2-base.yaml    # a pretrained LM on a GPU
    python train.py --config configs/tiny.yaml --set optim.lr=1e-3 --set loss.mode=ce
    python train.py evaluate --run runs/tiny              # generate + score the test split
    python train.py compare --config configs/compare-tiny.yaml   # the paper's three-row table
    python train.py --print-config                        # every key, its default and meaning

Rerunning the same command resumes from the newest checkpoint in ``run_dir``.
"""

import sys

from sevjax.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
