"""The command lines of ``train.py`` and ``classify.py``: parsing, help, and one error path.

A user error (bad config, bad data, a busy or foreign run_dir, damaged checkpoints, a non-finite
loss ...) prints ``error: ...`` on stderr (``config error: ...`` for the configuration itself)
and exits with status 1 (2 for a config or usage error, 130 when interrupted), without a
traceback; ``--debug`` (or ``SEVJAX_DEBUG=1``) shows the traceback instead. A bug (any other
exception) keeps its traceback. Multi-process environments are initialized here, before
anything touches JAX.

Typical use (the entry scripts)::

    sys.exit(train_main())      # train.py
    sys.exit(classify_main())   # classify.py
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # no "PyTorch was not found"

TRAIN_USAGE = """\
python train.py [--config YAML] [--set KEY=VALUE ...]   fine-tune (annotate -> tokenize -> train -> export)
python train.py evaluate --run DIR [--set KEY=VALUE ...]  generate for a split and score it
python train.py compare --config YAML [--set ...]         the paper's table: none / CE / severity rows
python train.py plan [--topology v5e:2x4] [--json OUT] [--set ...]   will it fit? (AOT compile)
python train.py COMMAND --print-config                    every config key, its default and meaning
Rerunning a command resumes from the newest checkpoint in its run_dir. Errors print one line;
add --debug (or SEVJAX_DEBUG=1) for the traceback."""

CLASSIFY_USAGE = """\
python classify.py train [--config YAML] [--set KEY=VALUE ...]   train the severity classifier
python classify.py evaluate [...]                                metrics and a reliability diagram
python classify.py annotate [--overwrite] [...]                  write p_mild, p_moderate, p_critical
python classify.py COMMAND --print-config                        every config key with its default
Errors print one line; add --debug (or SEVJAX_DEBUG=1) for the traceback."""


class _ConfigError(Exception):
    """A configuration that does not load or validate (exit status 2)."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause and fix: reported in one line, without a traceback."""
    from sevjax.checkpoint import CheckpointError
    from sevjax.loop import NonFiniteStep
    from sevjax.rundir import RunDirBusy

    return (ValueError, OSError, NonFiniteStep, CheckpointError, RunDirBusy)


def _parser(prog: str, usage: str, commands: Sequence[str], default: str | None):
    parser = argparse.ArgumentParser(
        prog=prog, usage=usage, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", nargs="?", default=default, choices=list(commands))
    parser.add_argument("--config", default=None, help="YAML overlay on the defaults")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one key, e.g. --set optim.lr=3e-4 (repeatable)",
    )  # fmt: skip
    parser.add_argument(
        "--print-config", action="store_true",
        help="list every key of the command's config with its default and meaning, and exit",
    )  # fmt: skip
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def print_config(schema: type) -> None:
    """Every key of ``schema`` with its default (JSON) and help text."""
    from sevjax.config import describe

    rows = describe(schema)
    width = max(len(k) for k, _, _ in rows)
    for key, value, help_text in rows:
        print(f"{key:<{width}}  {value:<24}  {help_text}".rstrip())


def _debug(args: argparse.Namespace) -> bool:
    return args.debug or os.environ.get("SEVJAX_DEBUG", "") not in ("", "0")


def _run(action: Callable[[], Any], debug: bool) -> int:
    """Runs ``action``: the one error path of both command lines; returns the exit status."""
    try:
        action()
    except _ConfigError as e:
        if debug:
            raise e.__cause__ or e from None
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except _user_errors() as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


def _config(schema: type, args: argparse.Namespace, extra: Sequence[str] = ()) -> Any:
    """Multi-process start-up, then the validated config (:class:`_ConfigError` if it fails)."""
    from sevjax.config import load
    from sevjax.distributed import initialize

    initialize()
    try:
        return load(schema, args.config, [*args.overrides, *extra])
    except (ValueError, OSError) as e:
        raise _ConfigError(str(e)) from e


def train_main(argv: Sequence[str] | None = None) -> int:
    """``train.py [evaluate|compare|plan] [--config YAML] [--set KEY=VALUE ...]``; the status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ("train", "evaluate", "compare", "plan")
    parser = _parser("train.py", TRAIN_USAGE, commands, "train")
    parser.add_argument("--run", default=None, help="evaluate: a train run dir, HF dir or Hub id")
    parser.add_argument("--topology", default=None, help="plan: a TPU topology, e.g. v5e:2x4")
    parser.add_argument("--json", default=None, help="plan: write the report here")
    parser.add_argument("--hbm-gib", type=float, default=None, help="plan: device memory (GiB)")
    args = parser.parse_args(argv)
    if args.run is not None and args.command != "evaluate":
        parser.error("--run is for the evaluate command")
    if args.command != "plan" and (args.topology or args.json or args.hbm_gib):
        parser.error("--topology, --json and --hbm-gib are for the plan command")
    from sevjax import schema

    kind = {"train": schema.TrainConfig, "evaluate": schema.EvalConfig}
    kind.update(compare=schema.CompareConfig, plan=schema.TrainConfig)
    if args.print_config:
        print_config(kind[args.command])
        return 0

    def action() -> Any:
        cfg = _config(kind[args.command], args, [f"run={args.run}"] if args.run else [])
        from sevjax import compare, pipeline, plan

        def planned(c):
            return plan.run(c, topology=args.topology, json_out=args.json, hbm_gib=args.hbm_gib)

        run = {"train": pipeline.train, "evaluate": pipeline.evaluate, "compare": compare.run}
        return {**run, "plan": planned}[args.command](cfg)

    return _run(action, _debug(args))


def classify_main(argv: Sequence[str] | None = None) -> int:
    """``classify.py {train,evaluate,annotate} [--config YAML] [--set ...]``; the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser("classify.py", CLASSIFY_USAGE, ("train", "evaluate", "annotate"), None)
    parser.add_argument("--overwrite", action="store_true", help="annotate: replace the output")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print(
            "classify.py: error: a command is required: train, evaluate or annotate",
            file=sys.stderr,
        )
        return 2
    from sevjax.schema import ClassifyConfig

    if args.print_config:
        print_config(ClassifyConfig)
        return 0

    def action() -> Any:
        cfg = _config(ClassifyConfig, args, ["overwrite=true"] if args.overwrite else [])
        from sevjax import annotate, classify

        run = {"train": classify.run, "evaluate": annotate.evaluate, "annotate": annotate.annotate}
        return run[args.command](cfg)

    return _run(action, _debug(args))
