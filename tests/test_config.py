"""Config schema, YAML overlay and --set overrides: typing, unknown keys, choices."""

import json
from pathlib import Path

import pytest

from sevjax.config import describe, from_dict, load, to_dict
from sevjax.schema import TrainConfig

# every train config shipped (the classifier's and compare's have their own schemas)
CONFIGS = sorted(
    p
    for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")
    if p.name != "classify.yaml" and not p.name.startswith("compare-")
)


def test_defaults_are_valid_and_round_trip_through_json():
    cfg = load(TrainConfig)
    again = from_dict(TrainConfig, json.loads(json.dumps(to_dict(cfg))))
    assert again == cfg


def test_overrides_are_typed_with_yaml():
    cfg = load(
        TrainConfig,
        overrides=[
            "optim.lr=3e-4",  # YAML 1.1 reads this as a string; the float field converts it
            "steps=7",
            "data.pack=true",
            "data.buckets=[32, 64]",
            "loss.weighting=[1, 2, 4]",
            "model.name_or_path=null",
            "data.columns.complaint=question",
        ],
    )
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.steps == 7 and cfg.data.pack is True and cfg.data.buckets == (32, 64)
    assert cfg.loss.weighting == (1.0, 2.0, 4.0)
    assert cfg.data.columns == {"complaint": "question"}


def test_yaml_overlay_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\noptim:\n  lr: 0.01\n  schedule: linear\n")
    cfg = load(TrainConfig, path, ["optim.lr=0.02"])
    assert (cfg.steps, cfg.optim.lr, cfg.optim.schedule) == (5, 0.02, "linear")
    assert cfg.optim.warmup_steps == TrainConfig().optim.warmup_steps  # untouched default


@pytest.mark.parametrize(
    "override, words",
    [
        ("optim.lrr=1", ["optim.lrr", "allowed keys", "lr", "warmup_steps", "grad_accum"]),
        ("stepz=1", ["stepz", "allowed keys", "steps", "run_dir"]),
        ("model.dtype=float16", ["model.dtype", "valid choices", "float32", "bfloat16"]),
        ("loss.mode=focal", ["loss.mode", "valid choices", "ce", "severity"]),
        ("loss.weighting=steep", ["loss.weighting", "uniform", "linear", "balanced"]),
        ("loss.normalize=mean", ["loss.normalize", "tokens", "weighted", "sequence"]),
        ("steps=ten", ["steps", "expected int"]),
        ("optim=3", ["optim", "section"]),
        ("optim.lr=-1", ["optim.lr", "> 0"]),
        ("loss.weighting=[1, 2]", ["loss.weighting", "3 positive"]),
    ],
)
def test_errors_name_the_key_and_the_options(override, words):
    with pytest.raises(ValueError) as err:
        load(TrainConfig, overrides=[override])
    for w in words:
        assert w in str(err.value)


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  batchsize: 4\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*data\.batchsize.*batch_size"):
        load(TrainConfig, path)


def test_cross_field_checks():
    with pytest.raises(ValueError, match="sequence"):
        load(TrainConfig, overrides=["data.pack=true", "loss.normalize=sequence"])
    with pytest.raises(ValueError, match="max_positions"):
        load(TrainConfig, overrides=["data.buckets=[1024]", "model.max_positions=512"])


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("steps: 5\noptim:\n  lr: [0.1\n")
    with pytest.raises(ValueError, match=r"broken\.yaml: invalid YAML at line \d+, column \d+"):
        load(TrainConfig, path)
    with pytest.raises(ValueError, match="is a directory"):
        load(TrainConfig, tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load(TrainConfig, tmp_path / "missing.yaml")


def test_describe_lists_every_key_with_default_and_help():
    rows = {k: (v, h) for k, v, h in describe(TrainConfig)}
    assert rows["optim.lr"][0] == "0.002"
    assert rows["data.buckets"][0] == "[64, 128, 256]"
    assert rows["model.name_or_path"] == (
        "null",
        "HF Hub id or local dir; None = random init below",
    )
    assert rows["loss"][0] == "" and rows["loss"][1]  # a section, with its docstring line
    leaves = {k for k, v, _ in describe(TrainConfig) if v != ""}
    assert leaves == set(_flat_keys(to_dict(TrainConfig())))


def _flat_keys(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("columns",):
            yield from _flat_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_document_their_command(path):
    text = path.read_text()
    assert text.startswith("#") and "python train.py" in text.splitlines()[0]
    keys = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(keys) <= 40  # short overlays (about 30 keys)
    load(TrainConfig, path)


def test_tiny_yaml_is_the_default():
    tiny = Path(__file__).parents[1] / "configs" / "tiny.yaml"
    assert load(TrainConfig, tiny) == load(TrainConfig)


@pytest.mark.parametrize(
    "name", [p.name for p in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))]
)
def test_every_shipped_config_loads_with_its_schema(name):
    from sevjax.schema import ClassifyConfig, CompareConfig

    path = Path(__file__).parents[1] / "configs" / name
    schema = ClassifyConfig if name == "classify.yaml" else TrainConfig
    schema = CompareConfig if name.startswith("compare-") else schema
    load(schema, path)
    assert "python " in path.read_text().splitlines()[0]  # opens with its run command
