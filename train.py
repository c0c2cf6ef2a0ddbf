"""Severity-aware fine-tuning of an Arabic medical language model.

Usage:
    python train.py                                       # tiny default: configs/tiny.yaml values
    python train.py --config configs/aragpt2-base.yaml    # a pretrained LM on a GPU
    python train.py --config configs/tiny.yaml --set optim.lr=1e-3 --set loss.mode=ce

Rerunning the same command resumes from the newest checkpoint in ``run_dir``.
"""

import sys

from sevjax.config import TrainConfig, parse_cli
from sevjax.train import NonFiniteLoss, run


def main(argv: list[str] | None = None) -> int:
    """Parses ``--config`` / ``--set``, runs training; returns the exit status."""
    try:
        cfg = parse_cli(TrainConfig, argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except (NonFiniteLoss, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
