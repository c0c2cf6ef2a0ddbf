"""``sevjax.plan``: the real train step compiled ahead of time from a config.json alone.

Local runs use the 8 fake CPU devices; TPU-topology runs need libtpu
(``pip install -r requirements-tpu.txt``) and are skipped without it.
"""

import json
import sys
from pathlib import Path

import pytest

from sevjax import cli, plan
from sevjax.config import load
from sevjax.schema import TrainConfig

TINY_QWEN2 = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rope_theta=1e6,
    tie_word_embeddings=True,
)
FSDP8 = ["mesh.data=1", "mesh.fsdp=8", "data.batch_size=8", "data.buckets=[32]"]
UNROLLED = ["model.scan_layers=false", "model.attention=xla"]
SCANNED = ["model.scan_layers=true", "model.attention=xla"]
TPU = pytest.mark.skipif(not plan.tpu_compiler_available(), reason="libtpu is not installed")


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    """A directory holding only a tiny Qwen2 config.json, and transformers' parameter count."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("qwen2-config")
    hf_config = Qwen2Config(**TINY_QWEN2)
    hf_config.to_json_file(path / "config.json")
    return path, Qwen2ForCausalLM(hf_config).num_parameters()


@pytest.fixture(scope="module")
def reports(config_dir, tmp_path_factory):
    """Two plans on 8 CPU devices (fsdp=8): unrolled, and scanned with a 1 MiB memory limit."""
    path, _ = config_dir
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    unrolled = plan.run(
        load(TrainConfig, None, [f"model.name_or_path={path}", *FSDP8, *UNROLLED]),
        json_out=str(out),
    )
    scanned = plan.plan(load(TrainConfig, None, [f"model.name_or_path={path}", *FSDP8, *SCANNED]),
                        hbm_gib=1 / 1024)  # fmt: skip
    return unrolled, scanned, json.loads(out.read_text())


def test_plan_from_config_json_alone(config_dir, reports):
    unrolled, _, written = reports
    assert written == unrolled
    assert unrolled["params"] == unrolled["trainable_params"] == config_dir[1]
    assert (unrolled["devices"], unrolled["device_kind"]) == (8, "cpu")
    assert unrolled["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert unrolled["tokens_per_step"] == 8 * 32
    assert unrolled["fits"] is True and unrolled["hbm_bytes_per_device"] is None
    assert unrolled["compile_seconds"] > 0


def test_memory_is_sharded_and_summed(reports):
    unrolled, _, _ = reports
    mem = unrolled["per_device_bytes"]
    assert mem["total"] == mem["arguments"] + mem["outputs"] + mem["temp"] - mem["aliased"]
    # float32 params + two Adam moments, sharded 8 ways (+ the batch and a few replicated leaves)
    sharded = 12 * unrolled["params"] / 8
    assert sharded <= mem["arguments"] <= 1.3 * sharded


def test_flops_match_the_model_formula(reports):
    unrolled, scanned, _ = reports
    # no remat and einsum attention: the program's matmuls are exactly 6N + 12LAT per token
    assert unrolled["flops_per_step"] == pytest.approx(unrolled["model_flops_per_step"], rel=1e-5)
    assert scanned["flops_per_step"] == pytest.approx(unrolled["flops_per_step"], rel=1e-5)
    assert unrolled["xla_counts_loops_once"] is False and scanned["xla_counts_loops_once"] is True
    # XLA adds elementwise FLOPs to the matmuls, and counts the scanned layers once
    assert unrolled["xla_flops_per_step"] >= unrolled["flops_per_step"]
    assert scanned["xla_flops_per_step"] < scanned["flops_per_step"]
    assert unrolled["kernels_counted_by_grid"] == []


def test_not_fitting_is_a_result(reports):
    _, scanned, _ = reports
    assert scanned["hbm_bytes_per_device"] == 2**20
    assert scanned["fits"] is False and scanned["per_device_bytes"]["total"] > 2**20
    assert "needs" in plan.table(scanned) and "NO" in plan.table(scanned)


def test_published_configs_by_hub_id():
    gpt2 = plan.resolve_model_config("aubmindlab/aragpt2-base")
    assert (gpt2.n_layer, gpt2.n_embd, gpt2.vocab_size) == (12, 768, 64000)
    llama = plan.resolve_model_config("meta-llama/Llama-3.1-8B")
    assert (llama.num_hidden_layers, llama.hidden_size, llama.tie_word_embeddings) == (
        32,
        4096,
        False,
    )
    with pytest.raises(FileNotFoundError):
        plan.resolve_model_config("nobody/no-such-model")


def test_bad_targets_raise_before_compiling(config_dir, monkeypatch):
    path, _ = config_dir
    base = [f"model.name_or_path={path}", "data.buckets=[32]"]
    with pytest.raises(ValueError, match="devices"):
        plan.plan(load(TrainConfig, None, [*base, "mesh.data=16"]), topology=None)
    with pytest.raises(ValueError, match="batch_size"):
        plan.plan(load(TrainConfig, None, [*base, "mesh.data=8", "data.batch_size=12"]))
    with pytest.raises(ValueError, match="positions"):
        plan.plan(load(TrainConfig, None, [*base, "data.buckets=[256]"]))
    monkeypatch.setattr(plan, "tpu_compiler_available", lambda: False)
    with pytest.raises(ValueError, match="requirements-tpu.txt"):
        plan.plan(load(TrainConfig, None, base), topology="v5e:2x2")


def test_oom_messages_are_parsed():
    used = "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Used 20.25G of 15.75G hbm."
    assert plan.oom_figures(used) == (int(20.25 * 2**30), int(15.75 * 2**30))
    temps = "exceeds available HBM (15.75G)"
    assert plan.oom_figures(f"required for HLO temporaries (512.00M) {temps}") == (
        512 * 2**20,
        int(15.75 * 2**30),
    )
    assert plan.oom_figures("INVALID_ARGUMENT: something else") is None


@TPU
def test_tpu_topology_fits_and_does_not_fit():
    tiny = ["model.model_type=llama", "model.layers=2", "model.width=128", "model.heads=2"]
    sets = [*tiny, "model.dtype=bfloat16", "mesh.data=1", "mesh.fsdp=4", "data.buckets=[128]"]
    sets += ["model.scan_layers=true", "model.remat=full"]
    with pytest.raises(ValueError, match="not accepted by libtpu"):
        plan.plan(load(TrainConfig, None, sets), topology="v5e:1x1")
    fits = plan.plan(load(TrainConfig, None, sets), topology="v5e:2x2")
    assert (fits["devices"], fits["device_kind"]) == (4, "TPU v5 lite")
    assert 15 * 2**30 < fits["hbm_bytes_per_device"] <= 16 * 2**30
    assert fits["fits"] is True and 0 < fits["per_device_bytes"]["total"] < 2**30
    # splash attention (a Pallas kernel) is counted by its grid; full remat adds a forward
    assert any(k.startswith("splash") for k in fits["kernels_counted_by_grid"])
    assert fits["flops_per_step"] > fits["model_flops_per_step"]
    # 2**26 x 128 tied embedding: 8.6e9 params, 12 bytes each over 4 chips > 16 GiB of arguments
    big = load(TrainConfig, None, [*sets, f"model.vocab_size={2**26}"])
    refused = plan.plan(big, topology="v5e:2x2")
    assert refused["fits"] is False and refused["compiler_error"].startswith("RESOURCE_EXHAUSTED")
    assert refused["compiler_required_bytes"] > refused["hbm_bytes_per_device"]


def test_compile_scaling_benchmark_runs(capsys):
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import plan_compile

    out = plan_compile.main(
        ["--layers", "1", "2", "--width", "32", "--seq", "32", "--repeats", "1"]
    )
    assert set(out) == {"scanned L=1", "scanned L=2"} and min(out.values()) > 0
    ratio = out["scanned L=2"] / out["scanned L=1"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"scanned compile time ratio L=2/L=1: {ratio:.2f}"


def test_cli_plan_writes_the_report_and_exits_zero(tmp_path, capsys):
    out = tmp_path / "plan.json"
    sets = ["model.layers=1", "model.width=32", "model.heads=2", "model.vocab_size=300",
            "data.buckets=[32]", "data.batch_size=8", "mesh.data=8"]  # fmt: skip
    argv = ["plan", "--json", str(out), *sum((["--set", s] for s in sets), []), "--hbm-gib", "1e-6"]
    assert cli.train_main(argv) == 0  # a step that does not fit is a result, not an error
    report = json.loads(out.read_text())
    assert report["fits"] is False and report["devices"] == 8 and report["trainable_params"] > 0
    assert "fits           NO" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:  # plan-only flags on another command
        cli.train_main(["evaluate", "--topology", "v5e:2x2"])
    assert usage.value.code == 2
