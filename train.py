"""Severity-aware fine-tuning of an Arabic medical language model.

Usage:
    python train.py                                       # tiny default: configs/tiny.yaml values
    python train.py --config configs/aragpt2-base.yaml    # a pretrained LM on a GPU
    python train.py --config configs/tiny.yaml --set optim.lr=1e-3 --set loss.mode=ce
    python train.py evaluate --run runs/tiny              # generate + score the test split
    python train.py compare --config configs/compare-tiny.yaml   # the paper's three-row table

Rerunning the same command resumes from the newest checkpoint in ``run_dir``.
"""

import sys

from sevjax.config import TrainConfig, parse_cli
from sevjax.train import NonFiniteLoss, run


def main(argv: list[str] | None = None) -> int:
    """Parses ``--config`` / ``--set``, runs training (or evaluation); returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("evaluate", "compare"):
        from sevjax.evaluate import main as evaluate_main

        return evaluate_main(argv)
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
