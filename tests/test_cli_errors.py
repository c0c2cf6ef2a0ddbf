"""The battery of bad inputs and faults (issue 14), driven through the real entry points.

Every case runs ``sevjax.cli.train_main`` / ``classify_main`` (a few run ``python train.py`` as a
subprocess) and asserts the exit status, the key words of the one-line message (file, row/line,
column/key, step, directory) and that nothing the user had was changed: input files hash the
same, a finished run's checkpoints and ``config.json`` are byte for byte what they were (or the
run resumes from them), and a fresh run_dir that failed on its inputs is not left behind.

One finished tiny run (module fixture) is shared; cases that damage it work on a copy. The cases'
messages are written to ``$SEVJAX_CLI_MESSAGES`` (JSON) when that variable is set.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sevjax import cli
from sevjax import data as data_lib
from sevjax import tokenizer as tokenizer_lib

REPO = Path(__file__).parents[1]
MESSAGES: dict[str, list[str]] = {}
PROBS = ("p_mild", "p_moderate", "p_critical")


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def _record_messages():
    yield
    if os.environ.get("SEVJAX_CLI_MESSAGES"):
        Path(os.environ["SEVJAX_CLI_MESSAGES"]).write_text(json.dumps(MESSAGES, indent=1))


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Path:
    """A 64-row annotated JSONL (48 train, 16 validation) and a 300-token BPE for it."""
    root = tmp_path_factory.mktemp("fx")
    splits = data_lib.split_examples(data_lib.load_examples())
    rng = np.random.default_rng(0)
    rows = []
    for ex in splits["train"][:48] + splits["validation"][:16]:
        p = rng.dirichlet([1.0, 1.0, 1.0])
        short = {k: " ".join(ex[k].split()[:n]) for k, n in (("complaint", 4), ("response", 8))}
        rows.append({"id": ex["id"], **short, "split": ex["split"], "severity": ex["severity"]})
        rows[-1].update(zip(PROBS, map(float, p / p.sum())))
    _jsonl(root / "annotated.jsonl", rows)
    texts = [r["complaint"] for r in rows] + [r["response"] for r in rows]
    tokenizer_lib.train_bpe_tokenizer(texts, 300, root / "tokenizer")
    return root


def _rows(fx: Path) -> list[dict]:
    return [json.loads(line) for line in (fx / "annotated.jsonl").read_text().splitlines()]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _sets(fx: Path, run_dir: Path, *extra: str) -> list[str]:
    """The tiny run of tests/test_train.py (2 layers, width 32, vocab 300, buckets [64])."""
    sets = [
        f"run_dir={run_dir}", f"data.path={fx / 'annotated.jsonl'}",
        f"model.tokenizer={fx / 'tokenizer'}", "model.layers=2", "model.width=32",
        "model.heads=2", "model.vocab_size=300", "model.max_positions=64", "data.buckets=[64]",
        "data.batch_size=8", "eval.batch_size=8", "eval.every=100", "optim.lr=3e-3",
        "optim.warmup_steps=2", "log.every=1", "log.tensorboard=false", "log.plot=false",
        "log.progress=false", "export_hf=false", "checkpoint.every=2", "mesh.data=1", "steps=6",
        *extra,
    ]  # fmt: skip
    return [a for s in sets for a in ("--set", s)]


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (the lock file, rewritten by each attempt, aside)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def _call(request, main, argv: list[str], capsys) -> tuple[int, str, str]:
    """Runs an entry point; returns ``(status, stdout, stderr)`` and records the message."""
    rc = main(argv)
    out, err = capsys.readouterr()
    MESSAGES.setdefault(request.node.name, []).append(err.strip())
    assert "Traceback" not in err
    return rc, out, err


def _error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith(("error: ", "config error: "))]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def finished(fx, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """One finished 6-step run (checkpoints 4 and 6) and its snapshot."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert cli.train_main(_sets(fx, run)) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4", "6"]
    return run, _snapshot(run)


def _copy(finished, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    return run


def _last_val_loss(run: Path) -> float:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "validation"][-1]["loss"]


# -------------------------------------------------------------------------- bad data files


def _csv(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def _with(rows: list[dict], i: int, **change) -> list[dict]:
    rows = [dict(r) for r in rows]
    rows[i].update(change)
    return rows


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _data_dir(d: Path, rows: list[dict]) -> Path:
    (d / "dir").mkdir()
    _jsonl(d / "dir" / "a.jsonl", rows)
    return d / "dir"


def _bad_sum_csv(rows):
    lines = ["complaint,response,split,p_mild,p_moderate,p_critical"]
    for k, r in enumerate(rows[:3]):
        p = (0.3, 0.3, 0.3) if k == 1 else (0.2, 0.3, 0.5)
        lines.append(f"{r['complaint']},{r['response']},{r['split']},{p[0]},{p[1]},{p[2]}")
    return "\n".join(lines) + "\n"


# fmt: off
DATA_CASES = {  # id: (writer(dir, rows) -> the file, extra --set lines, key words; {path} = file)
    "missing-file": (lambda d, r: d / "nope.jsonl", [], ["data file {path} not found"]),
    "directory-as-data": (
        _data_dir, [], ["{path} is a directory", "expected a data file", "a.jsonl"]),
    "empty-file": (
        lambda d, r: _csv(d / "e.csv", ""), [], ["{path}: the file is empty (0 bytes)"]),
    "whitespace-file": (
        lambda d, r: _csv(d / "w.jsonl", " \n\n"), [], ["{path}", "only whitespace"]),
    "header-only-csv": (
        lambda d, r: _csv(d / "h.csv", "complaint,response\n"), [],
        ["{path}: has a header but no data rows", "columns: complaint, response"]),
    "utf16-without-bom": (
        lambda d, r: _csv(d / "u.csv", "complaint,response\nأ,ب\n", "utf-16-le"), [],
        ["{path}: not UTF-8 text", "UTF-16 LE text without a byte-order mark"]),
    "utf16-with-bom-bad-row": (  # decoded (Excel's "Unicode text"), then row 2 is located
        lambda d, r: _csv(d / "u16.csv", _bad_sum_csv(r), "utf-16"), [],
        ["{path}, row 2 (line 3), columns p_mild/p_moderate/p_critical", "sum to 0.9"]),
    "probability-above-one": (
        lambda d, r: _jsonl(d / "p.jsonl", _with(r, 2, p_mild=1.5)), [],
        ["{path}, row 3 (line 3), column 'p_mild'", "finite and in [0, 1], got 1.5"]),
    "probability-nan": (
        lambda d, r: _jsonl(d / "p.jsonl", _with(r, 1, p_moderate=float("nan"))), [],
        ["{path}, row 2 (line 2), column 'p_moderate'", "got nan"]),
    "probability-not-a-number": (
        lambda d, r: _jsonl(d / "p.jsonl", _with(r, 4, p_critical="high")), [],
        ["{path}, row 5 (line 5), column 'p_critical'", "expected a probability, got 'high'"]),
    "probabilities-not-summing-to-one": (
        lambda d, r: _jsonl(d / "p.jsonl", _with(r, 6, p_mild=0.9, p_moderate=0.9)), [],
        ["{path}, row 7 (line 7), columns p_mild/p_moderate/p_critical", "expected 1"]),
    "probability-column-missing": (
        lambda d, r: _jsonl(d / "p.jsonl", [{k: x[k] for k in x if k != "p_critical"} for x in r]),
        [], ["{path}: probability columns incomplete, missing ['p_critical']"]),
    "missing-complaint-column": (
        lambda d, r: _jsonl(d / "q.jsonl", [{"question": x["complaint"], "response": "r"} for x in r]),
        [], ["{path}: missing column 'complaint'", "columns found: ['question', 'response']"]),
    "column-mapping-to-absent-column": (
        lambda d, r: _jsonl(d / "m.jsonl", r), ["data.columns.complaint=question"],
        ["{path}: missing column 'question' (field 'complaint')"]),
    "invalid-json-line": (
        lambda d, r: _csv(d / "j.jsonl", "".join(json.dumps(x) + "\n" for x in r[:3]) + "{oops\n"),
        [], ["{path}, row 4 (line 4): invalid JSON"]),
    "invalid-json-after-blank-lines": (  # rows and lines differ: both are named
        lambda d, r: _csv(d / "j.jsonl", json.dumps(r[0]) + "\n\n\n" + json.dumps(r[1]) + "\n[1,\n"),
        [], ["{path}, row 3 (line 5): invalid JSON"]),
    "unknown-severity": (
        lambda d, r: _jsonl(d / "s.jsonl", _with(r, 1, severity="urgent")), [],
        ["{path}, row 2 (line 2), column 'severity'", "unknown severity label 'urgent'"]),
    "unknown-split": (
        lambda d, r: _jsonl(d / "s.jsonl", _with(r, 3, split="holdout")), [],
        ["{path}, row 4 (line 4), column 'split'", "unknown split 'holdout'"]),
    "duplicate-id": (
        lambda d, r: _jsonl(d / "i.jsonl", _with(r, 4, id=r[0]["id"])), [],
        ["{path}, row 5 (line 5), column 'id'", "duplicate id", "first seen at row 1"]),
    "empty-complaint": (
        lambda d, r: _jsonl(d / "c.jsonl", _with(r, 2, complaint="   ")), [],
        ["{path}, row 3 (line 3), column 'complaint'", "empty or whitespace-only text"]),
    "number-as-response": (
        lambda d, r: _jsonl(d / "n.jsonl", _with(r, 0, response=42)), [],
        ["{path}, row 1 (line 1), column 'response'", "expected a string, got int 42"]),
    "csv-row-with-extra-field": (
        lambda d, r: _csv(d / "x.csv", "complaint,response\na,b\nc,d,e\n"), [],
        ["{path}, row 2 (line 3)", "3 fields, header has 2"]),
    "xlsx-renamed-to-csv": (
        lambda d, r: _bytes(d / "book.csv", b"PK\x03\x04" + bytes(200)), [],
        ["{path}: not UTF-8 text", "ZIP archive", ".xlsx"]),
    "unsupported-extension": (
        lambda d, r: _csv(d / "notes.txt", "complaint,response\n"), [],
        ["{path}: unsupported extension"]),
    "json-object-not-array": (
        lambda d, r: _csv(d / "o.json", json.dumps({"rows": r[:2]})), [],
        ["{path}: the top level is a JSON object with keys ['rows']", "expected an array"]),
    "corrupt-parquet": (
        lambda d, r: _bytes(d / "t.parquet", b"PAR1" + bytes(64)), [],
        ["{path}: not a readable Parquet file"]),
    "bytes-not-utf8": (
        lambda d, r: _bytes(d / "b.jsonl", b'{"complaint": "\xff\xfe", "response": "r"}\n'), [],
        ["{path}, row 1 (line 1), column 'complaint'", "undecodable bytes (not UTF-8)"]),
    "no-severity-probabilities": (
        lambda d, r: _jsonl(d / "plain.jsonl", [{k: x[k] for k in list(x)[:4]} for x in r]), [],
        ["{path} has no severity probabilities", "python classify.py annotate", "loss.mode=ce"]),
    "no-validation-split": (
        lambda d, r: _jsonl(d / "t.jsonl", [{**x, "split": "train"} for x in r]), [],
        ["{path} has no 'validation' split"]),
}
# fmt: on


@pytest.mark.parametrize("writer, extra, words", DATA_CASES.values(), ids=DATA_CASES.keys())
def test_bad_data_file(request, fx, tmp_path, capsys, writer, extra, words):
    path = writer(tmp_path, _rows(fx))
    before = _snapshot(tmp_path)
    run = tmp_path / "runs" / "run"
    rc, _, err = _call(request, cli.train_main, _sets(fx, run, f"data.path={path}", *extra), capsys)
    line = _error_line(err)
    assert rc == 1
    for w in words:
        assert w.format(path=path) in err, (w, line)
    assert not run.parent.exists()  # a first run that failed on its inputs leaves no run_dir
    assert _snapshot(tmp_path) == before  # the input is untouched


# --------------------------------------------------------------------------------- configs


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


# fmt: off
CONFIG_CASES = {  # id: (YAML text or None, extra --set lines, key words; {path} = the YAML file)
    "yaml-syntax-error": (
        "steps: 3\noptim: {lr: [1e-3\nlog: 1\n", [], ["{path}", "invalid YAML at line 3, column"]),
    "yaml-top-level-list": ("- steps: 3\n", [], ["{path}", "expected a mapping at the top level"]),
    "yaml-unknown-key": (
        "optim:\n  learning_rate: 1e-3\n", [],
        ["{path}", "unknown config key 'optim.learning_rate'", "allowed keys in section 'optim'"]),
    "set-unknown-key": (
        None, ["model.widht=64"],
        ["unknown config key 'model.widht'", "allowed keys in section 'model'", "width"]),
    "set-bad-type": (
        None, ["model.width=abc"], ["config key 'model.width': expected int, got 'abc'"]),
    "set-bad-choice": (
        None, ["loss.mode=focal"], ["config key 'loss.mode'", "valid choices", "severity"]),
    "set-without-equals": (None, ["steps"], ["override 'steps' must look like key.sub=value"]),
    "section-given-a-value": (None, ["model=3"], ["config key 'model' is a section"]),
    "width-not-multiple-of-heads": (
        None, ["model.width=33"], ["model.width=33 must be a multiple of heads=2"]),
    "buckets-above-positions": (
        None, ["data.buckets=[128]"], ["max(data.buckets)=128 exceeds model.max_positions=64"]),
    "negative-learning-rate": (None, ["optim.lr=-1"], ["config key 'optim.lr': must be > 0"]),
    "two-free-mesh-axes": (None, ["mesh.fsdp=-1", "mesh.data=-1"], ["at most one -1"]),
}
# fmt: on


@pytest.mark.parametrize("yaml_text, extra, words", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_bad_config(request, fx, tmp_path, capsys, yaml_text, extra, words):
    path = _yaml(tmp_path, yaml_text) if yaml_text is not None else None
    argv = (["--config", str(path)] if path else []) + _sets(fx, tmp_path / "run", *extra)
    rc, _, err = _call(request, cli.train_main, argv, capsys)
    assert rc == 2 and _error_line(err).startswith("config error: ")
    for w in words:
        assert w.format(path=path) in err, (w, err)
    assert not (tmp_path / "run").exists()


def test_config_file_missing_directory_or_not_utf8(request, tmp_path, capsys):
    (tmp_path / "latin1.yaml").write_bytes("steps: 3 # caf\xe9\n".encode("latin-1"))
    for name, words in (
        ("none.yaml", "not found"),
        (".", "is a directory; expected a YAML file"),
        ("latin1.yaml", "not UTF-8 text"),
    ):
        rc, _, err = _call(request, cli.train_main, ["--config", str(tmp_path / name)], capsys)
        assert rc == 2 and "config file" in err and words in err, err


def test_classify_unknown_key(request, capsys):
    rc, _, err = _call(request, cli.classify_main, ["train", "--set", "epochz=3"], capsys)
    assert rc == 2 and "unknown config key 'epochz'" in err and "epochs" in err


def test_usage_errors(request, capsys):
    with pytest.raises(SystemExit) as e:
        cli.train_main(["bogus"])
    assert e.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.train_main(["compare", "--run", "x"])
    assert e.value.code == 2 and "--run is for the evaluate command" in capsys.readouterr().err
    rc, _, err = _call(request, cli.classify_main, [], capsys)
    assert rc == 2 and "a command is required: train, evaluate or annotate" in err


# ------------------------------------------------------------------------- models, tokenizers


def test_model_dir_without_config_json(request, fx, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(fx / "tokenizer", model)  # a tokenizer, weights maybe, but no config.json
    argv = _sets(fx, tmp_path / "run", f"model.name_or_path={model}")
    rc, _, err = _call(request, cli.train_main, argv, capsys)
    assert rc == 1 and "config.json" in _error_line(err) and str(model) in err
    assert "tokenizer" not in _error_line(err).replace(str(model), "")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["missing", "broken-json"])
def test_bad_tokenizer(request, fx, tmp_path, capsys, kind):
    tok = tmp_path / "tok"
    if kind == "broken-json":
        shutil.copytree(fx / "tokenizer", tok)
        (tok / "tokenizer.json").write_text("{}")
    argv = _sets(fx, tmp_path / "run", f"model.tokenizer={tok}")
    rc, _, err = _call(request, cli.train_main, argv, capsys)
    words = "no such directory" if kind == "missing" else "could not load a tokenizer from it"
    assert rc == 1 and f"model.tokenizer={tok}: {words}" in _error_line(err)
    assert not (tmp_path / "run").exists()


def test_too_small_buckets_write_nothing(request, fx, tmp_path, capsys):
    """No model.tokenizer: a BPE is trained, but not saved, since no example fits the buckets."""
    argv = _sets(fx, tmp_path / "run", "data.buckets=[4]", "model.tokenizer=null")
    rc, _, err = _call(request, cli.train_main, argv, capsys)
    assert rc == 1
    assert "no example keeps a response token within the largest of data.buckets (4 tokens)" in err
    assert "raise data.buckets" in err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------- reruns of a finished run


def test_rerun_with_another_width_is_refused_and_resumable(request, fx, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    rc, _, err = _call(request, cli.train_main, _sets(fx, run, "model.width=64"), capsys)
    line = _error_line(err)
    assert rc == 1
    assert f"{run / 'checkpoints'} holds checkpoints of another configuration (step 6)" in line
    assert "config keys that differ: model.width (saved 32, now 64)" in line
    assert "params/" in line and "use a new run_dir" in line.lower()
    assert _snapshot(run) == finished[1]  # checkpoints and config.json untouched
    rc, out, _ = _call(request, cli.train_main, _sets(fx, run), capsys)  # the original command
    assert rc == 0 and "resumed from step 6" in out


def test_rerun_with_bad_data_keeps_config_json(request, fx, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    bad = _csv(tmp_path / "bad.csv", "complaint,response\n")
    rc, _, err = _call(request, cli.train_main, _sets(fx, run, f"data.path={bad}"), capsys)
    assert rc == 1 and str(bad) in _error_line(err)
    assert (run / "config.json").read_bytes() == (finished[0] / "config.json").read_bytes()
    assert _snapshot(run) == finished[1]


def test_resume_false_on_a_dir_with_checkpoints(request, fx, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    argv = _sets(fx, run, "checkpoint.resume=false")
    rc, _, err = _call(request, cli.train_main, argv, capsys)
    line = _error_line(err)
    assert rc == 1 and f"{run / 'checkpoints'} already holds checkpoints" in line
    assert "checkpoint.resume=false" in line and "new run_dir" in line
    assert _snapshot(run) == finished[1]


@pytest.mark.parametrize("key", ["data.batch_size", "eval.batch_size"])
def test_batch_size_not_dividing_the_mesh(request, fx, finished, tmp_path, capsys, key):
    run = _copy(finished, tmp_path)
    rc, _, err = _call(request, cli.train_main, _sets(fx, run, "mesh.data=4", f"{key}=6"), capsys)
    assert rc == 1 and f"{key}=6 must divide over data x fsdp = 4 devices" in _error_line(err)
    assert _snapshot(run) == finished[1]


def test_two_runs_on_one_run_dir(request, fx, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    holder = "import sys, time\nfrom sevjax.rundir import RunDir\nwith RunDir(sys.argv[1]):\n"
    holder += "    print('locked', flush=True)\n    time.sleep(120)\n"
    child = subprocess.Popen(
        [sys.executable, "-c", holder, str(run)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        rc, _, err = _call(request, cli.train_main, _sets(fx, run), capsys)
    finally:
        child.kill()
        child.wait()
    line = _error_line(err)
    assert rc == 1 and f"run_dir {run} is in use by pid {child.pid} on " in line
    assert "another run_dir" in line
    assert _snapshot(run) == finished[1]


def test_run_dir_is_a_file(request, fx, tmp_path, capsys):
    path = tmp_path / "run"
    path.write_text("notes")
    rc, _, err = _call(request, cli.train_main, _sets(fx, path), capsys)
    assert rc == 1 and f"run_dir {path} exists and is not a directory" in _error_line(err)
    assert path.read_text() == "notes"


def test_truncated_newest_checkpoint_falls_back(request, fx, finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    data = run / "checkpoints" / "6" / "state" / "ocdbt.process_0" / "d"
    biggest = max(data.iterdir(), key=lambda p: p.stat().st_size)
    os.truncate(biggest, 100)
    step4 = {k: v for k, v in finished[1].items() if k.startswith("checkpoints/4/")}
    rc, out, err = _call(request, cli.train_main, _sets(fx, run, "log.progress=true"), capsys)
    assert rc == 0, err
    assert "weighted CE=" in err and "nll=" in err  # the bar labels the trained and plain losses
    line = next(x for x in out.splitlines() if "damaged" in x)
    MESSAGES[request.node.name].append(line)
    assert f"step 6 in {run / 'checkpoints'} is damaged" in line
    assert f"{run / 'checkpoints' / '6' / 'state'}" in line  # names the file that failed
    assert "resumed from step 4" in out
    moved = list((run / "checkpoints-damaged").iterdir())
    assert [p.name.split("-")[0] for p in moved] == ["6"] and str(moved[0]) in line
    assert (moved[0] / "state").is_dir()  # kept whole, not deleted
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4", "6"]  # 6 redone
    assert {k: v for k, v in _snapshot(run).items() if k.startswith("checkpoints/4/")} == step4
    assert abs(_last_val_loss(run) - _last_val_loss(finished[0])) <= 1e-6  # resumed exactly


def test_every_checkpoint_damaged_subprocess(request, fx, finished, tmp_path):
    """As a real ``python train.py``: one clear line, no Orbax/asyncio tracebacks on stderr."""
    run = _copy(finished, tmp_path)
    for step in ("4", "6"):
        data = run / "checkpoints" / step / "state" / "ocdbt.process_0" / "d"
        os.truncate(max(data.iterdir(), key=lambda p: p.stat().st_size), 100)
    config = (run / "config.json").read_bytes()
    proc = _script("train.py", *_sets(fx, run))
    MESSAGES.setdefault(request.node.name, []).append(proc.stderr.strip())
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
    line = _error_line(proc.stderr)
    assert f"no readable checkpoint in {run / 'checkpoints'}: step 6: " in line
    assert "; step 4: " in line and str(run / "checkpoints-damaged") in line
    assert sorted(p.name.split("-")[0] for p in (run / "checkpoints-damaged").iterdir()) == [
        "4",
        "6",
    ]
    assert (run / "config.json").read_bytes() == config


def test_nonfinite_step_is_one_line(request, fx, tmp_path, capsys):
    run = tmp_path / "run"
    sets = ("steps=2", "optim.lr=1e30", "optim.warmup_steps=0", "optim.grad_clip=0")
    rc, _, err = _call(request, cli.train_main, _sets(fx, run, *sets, "checkpoint.every=1"), capsys)
    line = _error_line(err)
    assert rc == 1 and "non-finite update at step 1" in line and "was not applied" in line
    assert "No checkpoint had been saved" in line
    assert not list((run / "checkpoints").glob("[0-9]*"))


# -------------------------------------------------------------------------------- evaluate


def test_evaluate_missing_run_fails_fast(request, tmp_path, capsys, monkeypatch):
    """No classifier is trained and nothing is written before ``--run`` is validated."""
    from sevjax import classify, pipeline

    def trains(*args, **kwargs):
        raise AssertionError("a classifier was trained before --run was validated")

    monkeypatch.setattr(classify, "run", trains)
    monkeypatch.setattr(pipeline, "annotate_embedded", trains)
    monkeypatch.chdir(tmp_path)
    t0 = time.time()
    for run in ("runs/nope", str(tmp_path / "nope")):  # the first also looks like a Hub id
        rc, _, err = _call(request, cli.train_main, ["evaluate", "--run", run], capsys)
        assert rc == 1 and f"--run {run}: no such directory" in _error_line(err)
    assert time.time() - t0 < 30
    assert list(tmp_path.iterdir()) == []  # no runs/eval/..., no severity_classifier


def test_evaluate_other_runs(request, finished, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    for argv, words in (
        (["evaluate", "--run", "empty"], "--run empty: neither a train run dir"),
        (["evaluate", "--run", str(finished[0])], "the train run has no hf/ export yet"),
        (["evaluate"], "evaluate needs a model: --run DIR"),
    ):
        rc, _, err = _call(request, cli.train_main, argv, capsys)
        assert rc == 1 and words in _error_line(err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    assert _snapshot(finished[0]) == finished[1]


# -------------------------------------------------------------------------------- classify


@pytest.fixture(scope="module")
def classifier(fx, tmp_path_factory) -> list[str]:
    """``--set`` lines of a classifier run dir holding an exported (untrained) tiny BERT: what
    ``annotate`` needs, without the minute of training."""

    from sevjax import classify, hf
    from sevjax.arabic import normalize
    from sevjax.config import load
    from sevjax.schema import ClassifyConfig

    run = tmp_path_factory.mktemp("classifier")
    sets = [f"run_dir={run}", f"data.path={fx / 'annotated.jsonl'}", "model.layers=1"]
    sets += ["model.width=16", "model.heads=2", "model.mlp=32", "model.max_length=32"]
    sets += ["mesh.data=1", "folds=0", "batch_size=16"]
    cfg = load(ClassifyConfig, None, sets)
    corpus = [normalize(r[k]) for r in _rows(fx) for k in ("complaint", "response")]
    tok = tokenizer_lib.train_wordpiece(corpus, 200)
    source, config = classify.classifier_source(cfg, tok, None)
    hf.save_pretrained(source.factory(), config, run / "hf", tokenizer=tok)
    (run / "calibration.json").write_text('{"temperature": 1.0}\n')
    return [a for s in sets for a in ("--set", s)]


def test_annotate_refuses_then_overwrites(request, fx, classifier, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text('{"mine": 1}\n')
    argv = ["annotate", *classifier, "--set", f"output={out}"]
    rc, _, err = _call(request, cli.classify_main, argv, capsys)
    assert rc == 1 and f"{out} already exists; pass --overwrite" in _error_line(err)
    assert out.read_text() == '{"mine": 1}\n'
    rc, _, err = _call(request, cli.classify_main, [*argv, "--overwrite"], capsys)
    assert rc == 0, err
    rows = data_lib.load_examples(out)  # validates p_* (finite, summing to 1) per row
    assert len(rows) == len(_rows(fx)) and all(set(PROBS) <= set(r) for r in rows)


def test_annotate_onto_its_input(request, fx, classifier, tmp_path, capsys):
    data = _jsonl(tmp_path / "in.jsonl", _rows(fx))
    before = _snapshot(tmp_path)
    argv = ["annotate", "--overwrite", *classifier, "--set", f"data.path={data}"]
    rc, _, err = _call(request, cli.classify_main, [*argv, "--set", f"output={data}"], capsys)
    assert rc == 1 and f"annotate output {data} is the input file" in _error_line(err)
    assert _snapshot(tmp_path) == before


def test_classify_errors_write_nothing(request, fx, tmp_path, capsys):
    run = tmp_path / "c"
    header = _csv(tmp_path / "h.csv", "complaint,response\n")
    for argv, words in (
        (
            ["train", "--set", "batch_size=6", "--set", "mesh.data=4"],
            "batch_size=6 must be a multiple of the 4 data devices",
        ),
        (["train", "--set", f"data.path={header}"], f"{header}: has a header but no data rows"),
        (["evaluate"], f"no trained classifier in {run}: python classify.py train"),
        (["annotate"], f"no trained classifier in {run}: python classify.py train"),
    ):
        sets = ["--set", f"run_dir={run}", "--set", f"data.path={fx / 'annotated.jsonl'}"]
        rc, _, err = _call(request, cli.classify_main, [argv[0], *sets, *argv[1:]], capsys)
        assert rc == 1 and words in _error_line(err), err
        assert not run.exists()


# ------------------------------------------------------------------------ help and config


def test_help_mentions_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.train_main(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    for word in ("evaluate --run", "compare --config", "--print-config", "--debug", "SEVJAX_DEBUG"):
        assert word in text, word
    with pytest.raises(SystemExit) as e:
        cli.classify_main(["--help"])
    text = capsys.readouterr().out
    for word in ("classify.py train", "evaluate", "annotate [--overwrite]", "--print-config"):
        assert word in text, word


@pytest.mark.parametrize(
    "main, argv, words",
    [
        (
            cli.train_main,
            [],
            ["optim.lr", "checkpoint.resume", "resume from the latest checkpoint"],
        ),
        (cli.train_main, ["evaluate"], ["scorer.layer", "generation.max_new_tokens", "run "]),
        (cli.train_main, ["compare"], ["bootstrap.n_resamples", "models", "train_overrides"]),
        (cli.classify_main, ["annotate"], ["overwrite", "annotate: replace", "data.labels"]),
    ],
    ids=["train", "evaluate", "compare", "classify"],
)
def test_print_config(capsys, main, argv, words):
    assert main([*argv, "--print-config"]) == 0
    text = capsys.readouterr().out
    for word in words:
        assert word in text, word
    assert all(len(line.split()) >= 1 for line in text.splitlines())


# ------------------------------------------------------------------- as real subprocesses


def _script(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python <argv>`` in the repository root; stdout and stderr captured."""
    return subprocess.run(
        [sys.executable, *argv], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=300,
    )  # fmt: skip


def test_subprocess_user_error_is_one_line(request, tmp_path):
    sets = (f"data.path={tmp_path / 'none.csv'}", f"run_dir={tmp_path / 'r'}")
    proc = _script("train.py", *(a for s in sets for a in ("--set", s)))
    MESSAGES.setdefault(request.node.name, []).append(proc.stderr.strip())
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"error: data file {tmp_path / 'none.csv'} not found"
    ]
    assert not (tmp_path / "r").exists()


def test_subprocess_config_error_and_debug(request, tmp_path):
    bad = _yaml(tmp_path, "a: [1\n")
    proc = _script("train.py", "--config", str(bad))
    MESSAGES.setdefault(request.node.name, []).append(proc.stderr.strip())
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert _error_line(proc.stderr).startswith(f"config error: config file {bad}: invalid YAML")
    proc = _script("train.py", "--config", str(bad), env={"SEVJAX_DEBUG": "1"})
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "invalid YAML" in proc.stderr


def test_subprocess_help_without_advisories():
    proc = _script("train.py", "--help")
    assert proc.returncode == 0 and "evaluate" in proc.stdout and "compare" in proc.stdout
    assert proc.stderr == ""


HIDE_TORCH = """
import importlib.util, sys
find = importlib.util.find_spec
importlib.util.find_spec = lambda n, p=None: None if n.split(".")[0] == "torch" else find(n, p)
if sys.argv[1] == "cli":
    import sevjax.cli
import transformers
transformers.AutoTokenizer
"""


def test_no_pytorch_advisory_from_the_command_line():
    """Without torch, transformers prints "PyTorch was not found"; sevjax.cli silences it."""
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    runs = {}
    for how in ("plain", "cli"):
        runs[how] = subprocess.run(
            [sys.executable, "-c", HIDE_TORCH, how],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=env,
        )
        assert runs[how].returncode == 0, runs[how].stderr
    if "PyTorch was not found" not in runs["plain"].stderr:  # the check must see the advisory
        pytest.skip("this transformers prints no PyTorch advisory")
    assert "PyTorch was not found" not in runs["cli"].stderr


def test_import_loss_stays_light():
    code = (
        "import sys, sevjax.loss\nheavy = ('transformers', 'flax', 'orbax', 'torch', 'datasets')\n"
    )
    code += "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
