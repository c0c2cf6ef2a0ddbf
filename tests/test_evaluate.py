"""Evaluation and the comparison table: bucketed generation, a 2-step-per-row compare, evaluate."""

import json
from pathlib import Path

import _lm_fixtures as lm_fixtures
import numpy as np
import pytest
import test_bertscore

from sevjax import cli, compare, models, schema, tokenizer
from sevjax import evaluate as ev
from sevjax.config import from_dict, load

REPO = Path(__file__).parents[1]
SEVERITY_TEXT = {
    "mild": ("صداع خفيف", "اشرب الماء وخذ قسطا من الراحة"),
    "moderate": ("حرارة مرتفعة وسعال", "راجع الطبيب خلال يومين"),
    "critical": ("ألم شديد في الصدر", "اذهب إلى الطوارئ فورا"),
}
PARTS = ("الرأس", "البطن", "الظهر", "الحلق")
N_TEST = 6


def _rows():
    """36 short examples: 24 train, 6 validation, 6 test, severities cycling, with p_*."""
    rows = []
    for i in range(36):
        sev = ("mild", "moderate", "critical")[i % 3]
        complaint, advice = SEVERITY_TEXT[sev]
        probs = {f"p_{s}": 0.8 if s == sev else 0.1 for s in SEVERITY_TEXT}
        rows.append(
            {
                "id": f"ex{i}",
                "complaint": f"{complaint} في {PARTS[i % 4]} منذ {i % 5 + 1} أيام",
                "response": f"{advice} وراقب {PARTS[(i + 1) % 4]}",
                "severity": sev,
                "split": "train" if i < 24 else "validation" if i < 30 else "test",
                **probs,
            }
        )
    return rows


TRAIN_OVERRIDES = [*lm_fixtures.TINY_LM, "optim.warmup_steps=1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    rows = _rows()
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    texts = [r["complaint"] for r in rows] + [r["response"] for r in rows]
    scorer = test_bertscore.make_tiny_bert(root / "scorer", texts)
    common = {
        "max_examples": N_TEST,
        # Sampling: greedy decoding of a 2-step model only repeats the prompt's last token (a
        # space), which would leave every score at 0.
        "generation": {"max_new_tokens": 8, "batch_size": 4, "temperature": 1.0},
        "scorer": {"model_path": str(scorer), "layer": 1, "batch_size": 8},
    }
    return root, data, common


@pytest.fixture(scope="module")
def compared(setup):
    """pipeline.train 2 steps per fine-tuned row, then the three evaluations and the report."""
    root, data, common = setup
    cfg = from_dict(
        schema.CompareConfig,
        {
            **common,
            "out_dir": str(root / "compare"),
            "steps": 2,
            "seeds": [0, 1],
            "train_overrides": [*TRAIN_OVERRIDES, f"data.path={data}"],
            "bootstrap": {"n_resamples": 200},
        },
    )
    return cfg, compare.run(cfg)


def test_compare_writes_table_json_png(compared):
    cfg, report = compared
    out = Path(cfg.out_dir)
    for name in ("compare.md", "compare.json", "compare.png"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "compare.json").read_text()) == json.loads(json.dumps(report))
    table = (out / "compare.md").read_text()
    for label in (
        "| tiny-gpt2 | none |",
        "| tiny-gpt2 | CE |",
        "| tiny-gpt2 | severity-weighted |",
        "val NLL critical",
        "severity-weighted minus CE",
    ):
        assert label in table
    m = report["models"]["tiny-gpt2"]
    assert set(m["rows"]) == {"none", "ce", "severity"}
    for row in ("none", "ce", "severity"):
        for seed in (0, 1):
            recs = _records(out, seed, row)
            assert len(recs) == N_TEST
            assert (
                sum(r["severity"] == s for r in recs for s in ("mild", "moderate", "critical"))
                == N_TEST
            )


def _records(out, seed, row):
    path = out / "tiny-gpt2" / f"seed-{seed}" / row / "eval" / "generations.jsonl"
    return [json.loads(x) for x in path.open()]


def test_compare_cis_match_records_and_logs(compared):
    cfg, report = compared
    out = Path(cfg.out_dir)
    m = report["models"]["tiny-gpt2"]
    diffs = m["minus_baseline"]["severity"]
    per_seed = []
    for seed in (0, 1):
        ce, sev = _records(out, seed, "ce"), _records(out, seed, "severity")
        assert set(ce[0]) == {"id", "complaint", "reference", "generation", "severity", "scores"}
        d = np.mean(
            [b["scores"]["bertscore_f1"] - a["scores"]["bertscore_f1"] for a, b in zip(ce, sev)]
        )
        cell = diffs["bertscore_f1"]["overall"]["per_seed"][seed]
        assert cell["diff"] == pytest.approx(d, abs=1e-12)
        assert cell["lo"] <= cell["diff"] <= cell["hi"] and cell["n"] == N_TEST
        crit = diffs["chrf_sentence"]["critical"]["per_seed"][seed]
        assert crit["n"] == sum(r["severity"] == "critical" for r in ce)
        per_seed.append(d)
        # the per-severity validation NLL of each row is the run's own last validation record
        for row in ("ce", "severity"):
            rows = [
                json.loads(x)
                for x in (out / "tiny-gpt2" / f"seed-{seed}" / row / "metrics.jsonl").open()
            ]
            last = max((r for r in rows if r["split"] == "validation"), key=lambda r: r["step"])
            assert m["rows"][row]["seeds"][seed]["nll/critical"] == pytest.approx(
                last["loss/critical"]
            )
    over = diffs["bertscore_f1"]["overall"]
    assert over["mean"] == pytest.approx(np.mean(per_seed), abs=1e-12) and over["n"] == 2
    assert over["lo"] <= over["mean"] <= over["hi"]
    nll = diffs["nll"]["critical"]
    assert nll["n"] == 2 and nll["lo"] <= nll["mean"] <= nll["hi"]
    assert all(r["scores"]["bertscore_f1"] > 0 for r in _records(out, 0, "ce") if r["generation"])


def test_evaluate_cli_reproduces_the_compare_row(compared, setup, capsys):
    cfg, report = compared
    run = Path(cfg.out_dir) / "tiny-gpt2" / "seed-0" / "ce"
    _, _, common = setup
    sets = [
        f"max_examples={N_TEST}",
        f"out_dir={run / 'eval-again'}",
        "generation.max_new_tokens=8",
        "generation.batch_size=4",
        "generation.temperature=1.0",
        f"scorer.model_path={common['scorer']['model_path']}",
        "scorer.layer=1",
    ]
    argv = ["evaluate", "--run", str(run), *sum((["--set", s] for s in sets), [])]
    assert cli.train_main(argv) == 0
    assert "| overall |" in capsys.readouterr().out
    summary = json.loads((run / "eval-again" / "summary.json").read_text())
    expected = json.loads((run / "eval" / "summary.json").read_text())["overall"]
    assert summary["overall"] == pytest.approx(expected, abs=1e-6)  # float32 scorer runs
    f1 = report["models"]["tiny-gpt2"]["rows"]["ce"]["seeds"][0]["bertscore_f1"]
    assert summary["overall"]["bertscore_f1"] == pytest.approx(f1, abs=1e-6)


def test_bucketed_generation_equals_one_by_one():
    texts = ["ألم في الصدر", "صداع خفيف منذ يومين", "حرارة", "سعال وحرارة مرتفعة منذ أسبوع"]
    tok = tokenizer.train_bpe_tokenizer(texts * 3, 300)
    config = models.config_from_hf(
        {"model_type": "gpt2", "vocab_size": 300, "n_layer": 2, "n_embd": 32, "n_head": 2,
         "n_positions": 64, "eos_token_id": tok.eos_token_id}
    )  # fmt: skip
    model = models.build(config, seed=0)
    prompts = [tok.encode(t) for t in texts]
    kw = dict(max_positions=64, eos_ids=(tok.eos_token_id,))
    gen = schema.GenerationSection(max_new_tokens=6, batch_size=3, prompt_buckets=(4, 16))
    batched = ev.generate_texts(model, tok, prompts, gen, **kw)
    single = schema.GenerationSection(max_new_tokens=6, batch_size=1, prompt_buckets=(64,))
    assert batched == ev.generate_texts(model, tok, prompts, single, **kw)
    assert any(batched)


def test_configs_load_and_scorer_layer_is_required():
    cfg = load(schema.CompareConfig, REPO / "configs" / "compare-tiny.yaml")
    assert cfg.models and cfg.steps > 0
    with pytest.raises(ValueError, match="layer 9"):
        load(schema.EvalConfig, overrides=["scorer.model_path=/some/bert"])
    with pytest.raises(ValueError, match="unknown config key 'models\\[0\\].lr'"):
        from_dict(schema.CompareConfig, {"models": [{"name": "a", "lr": 1}]})
