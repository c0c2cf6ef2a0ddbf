"""Config schema, YAML overlay and --set overrides: typing, unknown keys, choices."""

import json
from pathlib import Path

import pytest

from sevjax.config import TrainConfig, from_dict, load, parse_cli, to_dict

CONFIGS = [
    Path(__file__).parents[1] / "configs" / f
    for f in ("tiny.yaml", "aragpt2-base.yaml", "aragpt2-medium.yaml", "qwen2.5-0.5b.yaml")
]


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


def test_parse_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 3\n")
    cfg = parse_cli(TrainConfig, ["--config", str(path), "--set", "seed=4", "--set", "mesh.data=2"])
    assert (cfg.steps, cfg.seed, cfg.mesh.data) == (3, 4, 2)
    with pytest.raises(FileNotFoundError):
        parse_cli(TrainConfig, ["--config", str(tmp_path / "missing.yaml")])


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
