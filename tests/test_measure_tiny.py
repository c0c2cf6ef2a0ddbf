"""scripts/measure_tiny.py: the generated blocks are well formed and replace only their markers."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("measure_tiny", ROOT / "scripts" / "measure_tiny.py")
measure_tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(measure_tiny)


def _ci(mean, half=0.01):
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": 3}


def _metrics(ece):
    return {"accuracy": 0.6, "macro_f1": 0.55, "nll": 0.9, "brier": 0.5, "ece": ece}


@pytest.fixture
def measurement(tmp_path):
    run = tmp_path / "tiny"
    (run / "severity_classifier").mkdir(parents=True)
    (run / "severity_classifier" / "eval.md").write_text("| split | ... |\n")
    rows = {
        r: {"mean": {"bertscore_f1": _ci(v)}}
        for r, v in (("none", 0.2), ("ce", 0.6), ("severity", 0.61))
    }
    diffs = {"bertscore_f1": {s: _ci(0.01) for s in ("overall", "critical")},
             "nll": {s: _ci(-0.02) for s in ("mild", "moderate", "critical")}}  # fmt: skip
    return {
        "machine": "test cpu",
        "rule": {"accuracy": 0.616, "macro_f1": 0.603},
        "classifier": {
            "temperature": 5.3,
            "baseline_macro_f1": {"test": 0.167},
            "test": {"raw": _metrics(0.35), "calibrated": _metrics(0.07)},
            "train": {"in_sample": _metrics(0.05), "out_of_fold": _metrics(0.12)},
        },
        "classifier_summary": {
            "best_epoch": 12,
            "epochs_run": 20,
            "val_macro_f1": 0.54,
            "val_labels": "gold",
        },  # fmt: skip
        "train": {"run_dir": str(run), "val_loss_start": 6.96, "val_loss_end": 4.2},
        "train_s": 300.0,
        "compare": {
            "seeds": [0, 1, 2],
            "models": {"tiny-gpt2": {"rows": rows, "minus_baseline": {"severity": diffs}}},
        },
        "compare_s": 900.0,
        "test_n": 66,
    }


def test_blocks_hold_every_figure(measurement):
    readme = measure_tiny.readme_block(measurement)
    for text in ("test cpu", "0.616", "T = 5.30", "ECE 0.050 vs 0.120", "6.960 -> 4.200",
                 "none 0.200 [0.190, 0.210]", "critical 0.010 [0.000, 0.020]", "15.0 min"):  # fmt: skip
        assert text in readme, text
    assert "| split | ... |" in measure_tiny.data_block(measurement)
    # the verdict follows the figures: BERTScore +0.01 [0.00, 0.02] includes zero, NLL excludes it
    assert "Over 3 seeds" in readme and "(the interval includes zero)" in readme
    assert "-0.020 [-0.030, -0.010] on critical cases (lower: better)" in readme


def test_replace_block_touches_only_the_marked_text(tmp_path):
    path = tmp_path / "doc.md"
    begin, end = measure_tiny.BEGIN, measure_tiny.END
    path.write_text(f"before\n{begin}\nold\n{end}\nafter\n")
    measure_tiny.replace_block(path, "new figures")
    assert path.read_text() == f"before\n{begin}\nnew figures\n{end}\nafter\n"
    (tmp_path / "none.md").write_text("no markers")
    with pytest.raises(SystemExit, match="no"):
        measure_tiny.replace_block(tmp_path / "none.md", "x")
    for doc in ("README.md", "DATA.md"):  # the real documents carry the markers
        text = (ROOT / doc).read_text()
        assert text.count(begin) == 1 and text.count(end) == 1, doc
