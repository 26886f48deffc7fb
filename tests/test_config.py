import re

import pytest
import torch
from torch import nn

from gemma_opt.cli import main
from gemma_opt.config import OTHER_VARIABLES, SPARSITY_CHOICES, ConfigError, PipelineConfig, env_names
from gemma_opt.filtering import build_filter_map
from gemma_opt.quantization import TORCHAO_CONFIGS, check_supported

from conftest import ROOT, repo_text


def test_defaults_are_the_product_pipeline():
    cfg = PipelineConfig()
    assert cfg.model == "weights/gemma-3-4b-it"
    assert (cfg.prune.method, cfg.quant.mode, cfg.compile.mode) == ("none", "int8_weight_only", "default")


@pytest.mark.parametrize("prune, message", [
    ({"method": "magnitude", "ratio": 0.9}, "ratio must be within [0.01, 0.8]"),
    ({"method": "magnitude", "ratio": 0.005}, "ratio must be within [0.01, 0.8]"),
    ({"method": "magnitude"}, "ratio must be within"),
    ({"method": "snip", "ratio": 0.3}, "prune.method"),
    ({"method": "magnitude", "pattern": "2:4", "ratio": 0.3}, "fixes the ratio at 0.5"),
    ({"method": "magnitude", "pattern": "4:2"}, "pattern must be"),
    ({"method": "layer_norm", "ratio": 0.3, "scope": "global"}, "scope must be per_layer"),
    ({"method": "wanda", "ratio": 0.3, "scope": "global"}, "scope must be per_layer"),
    ({"method": "gradual", "pattern": "2:4"}, "pattern 2:4 works with magnitude or wanda, not gradual"),
    ({"method": "wanda", "pattern": "2:4", "layer_ratios": "owl"}, "layer_ratios must be uniform"),
    ({"method": "gradual", "ratio": 0.3, "layer_ratios": "owl"}, "'owl' works with per_layer magnitude or wanda"),
    ({"method": "magnitude", "ratio": 0.3, "scope": "global", "layer_ratios": "owl"}, "not global magnitude"),
])
def test_bad_prune_config_raises_one_clear_error(prune, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        PipelineConfig.validated({"prune": prune})


def test_n_m_pattern_implies_its_ratio():
    for method in ("magnitude", "wanda"):
        cfg = PipelineConfig.validated({"prune": {"method": method, "pattern": "2:4"}})
        assert cfg.prune.target_ratio == 0.5 and cfg.prune.n_m == (2, 4)


def test_sparsity_choices_name_a_method_and_its_layer_ratios():
    assert list(SPARSITY_CHOICES) == ["none", "magnitude", "wanda", "gradual", "neurons", "layer_norm",
                                      "owl-magnitude", "owl-wanda"]
    for choice, prune in SPARSITY_CHOICES.items():
        cfg = PipelineConfig.validated({"prune": {**prune, "ratio": None if choice == "none" else 0.3}})
        assert cfg.prune.choice == choice


def test_unknown_quantization_and_compile_modes_are_rejected():
    with pytest.raises(ConfigError, match="quant.mode"):
        PipelineConfig.validated({"quant": {"mode": "int3"}})
    with pytest.raises(ConfigError, match="compile.mode"):
        PipelineConfig.validated({"compile": {"mode": "fast"}})


def test_int4_on_this_cpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="int4_weight_only is not supported by torchao .* on cpu"):
        check_supported("int4_weight_only", TORCHAO_CONFIGS["int4_weight_only"], torch.device("cpu"), torch.bfloat16)


def test_filter_pattern_matching_nothing_is_an_error():
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module()])
    model.layers[0].mlp = nn.Module()
    model.layers[0].mlp.up_proj = nn.Linear(4, 4)
    assert list(build_filter_map(model).modules) == ["layers.0.mlp.up_proj"]
    for key in ("include", "exclude"):
        with pytest.raises(ConfigError, match=f"{key} pattern '\\*q_porj' matches no"):
            build_filter_map(model, PipelineConfig.validated({"filter": {key: ["*q_porj"]}}).filter)


def test_every_option_has_an_env_var_and_env_overrides_file(tmp_path):
    names = env_names()
    assert {"GEMMA_OPT_MODEL", "GEMMA_OPT_PRUNE_METHOD", "GEMMA_OPT_PRUNE_RATIO", "GEMMA_OPT_QUANT_MODE",
            "GEMMA_OPT_COMPILE_MODE", "GEMMA_OPT_FILTER_INCLUDE_VISION"} <= set(names)
    yaml_file = tmp_path / "pipeline.yaml"
    yaml_file.write_text("model: tiny-random\nprune: {method: magnitude, ratio: 0.2}\n")
    cfg = PipelineConfig.load(yaml_file, env={"GEMMA_OPT_PRUNE_RATIO": "0.4", "GEMMA_OPT_FILTER_EXCLUDE": "*down_proj, *up_proj"})
    assert (cfg.model, cfg.prune.method, cfg.prune.ratio) == ("tiny-random", "magnitude", 0.4)
    assert cfg.filter.exclude == ["*down_proj", "*up_proj"]
    toml_file = tmp_path / "pipeline.toml"
    toml_file.write_text('[quant]\nmode = "none"\n')
    assert PipelineConfig.load(env={"GEMMA_OPT_CONFIG": str(toml_file)}).quant.mode == "none"
    with pytest.raises(ConfigError, match="prune.ratio"):
        PipelineConfig.load(env={"GEMMA_OPT_PRUNE_METHOD": "magnitude", "GEMMA_OPT_PRUNE_RATIO": "lots"})
    with pytest.raises(ConfigError, match=r"^unknown variable GEMMA_OPT_PRUNE_RATO \(did you mean GEMMA_OPT_PRUNE_RATIO\?\)"):
        PipelineConfig.load(env={"GEMMA_OPT_PRUNE_METHOD": "magnitude", "GEMMA_OPT_PRUNE_RATO": "0.3"})
    assert PipelineConfig.load(env={"GEMMA_OPT_WEIGHTS_CACHE": "/tmp", "GEMMA_OPT_TOKENIZER": "/tmp"}) == PipelineConfig()
    (tmp_path / "broken.yaml").write_text("prune: {method: wanda\n")
    (tmp_path / "list.yaml").write_text("- wanda\n")
    for name, reason in (("missing.yaml", "No such file"), ("broken.yaml", "expected ',' or '}'"),
                         ("list.yaml", "expected sections and options, got \\['wanda'\\]")):
        with pytest.raises(ConfigError, match=f"^pipeline config file {tmp_path / name}: .*{reason}"):
            PipelineConfig.load(env={"GEMMA_OPT_CONFIG": str(tmp_path / name)})


def test_config_command_prints_the_pipeline_as_a_file_and_as_variables_that_load_back(tmp_path, monkeypatch, capsys):
    """What cog.yaml points to for every option: each output, read back, is the same pipeline."""
    env = {"GEMMA_OPT_MODEL": "gemma-3-270m", "GEMMA_OPT_PRUNE_METHOD": "wanda", "GEMMA_OPT_PRUNE_RATIO": "0.3",
           "GEMMA_OPT_FILTER_EXCLUDE": "*down_proj,*up_proj", "GEMMA_OPT_COMPILE_WARMUP": "false"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    expected = PipelineConfig.load(env=env)
    main(["config"])
    (tmp_path / "pipeline.yaml").write_text(capsys.readouterr().out)
    assert PipelineConfig.load(tmp_path / "pipeline.yaml", env={}) == expected
    main(["config", "--env"])
    lines = capsys.readouterr().out.splitlines()
    variables = dict(line.split("=", 1) for line in lines if not line.startswith("#"))
    assert list(variables) == list(env_names()) and PipelineConfig.load(env=variables) == expected
    readme = (ROOT / "README.md").read_text()
    assert [name for name in variables if f"`{name}`" not in readme] == [], "README's configuration table"
    assert variables["GEMMA_OPT_FILTER_EXCLUDE"] == "*down_proj,*up_proj" and variables["GEMMA_OPT_FALLBACK_MODEL"] == ""
    assert "# fraction of weights zeroed" in lines[lines.index("GEMMA_OPT_PRUNE_RATIO=0.3") - 1]
    assert lines[lines.index("GEMMA_OPT_QUANT_MODE=int8_weight_only") - 1].endswith(
        "one of none, int8_weight_only, int4_weight_only, float8_weight_only, float8_dynamic")

    main(["config", "--cog-yaml", str(ROOT / "cog.yaml")])  # cog.yaml's environment, not this shell's
    deployed = capsys.readouterr().out
    assert "model: weights/gemma-3-4b-it" in deployed and "cache_dir: weights/cache" in deployed
    monkeypatch.setenv("GEMMA_OPT_PRUNE_RATIO", "lots")
    with pytest.raises(SystemExit, match="^error: invalid pipeline config: prune.ratio: "):
        main(["config"])


def test_every_gemma_opt_variable_the_repo_names_exists():
    """A name that is no option fails setup (above), so none may be shown or set anywhere."""
    named = set(re.findall(r"GEMMA_OPT_[A-Z0-9_]*[A-Z0-9]", repo_text()))
    assert {"GEMMA_OPT_MODEL", "GEMMA_OPT_CACHE_DIR", "GEMMA_OPT_WEIGHTS_CACHE"} <= named
    assert named - set(env_names()) - set(OTHER_VARIABLES) == set()


def test_semi_structured_needs_2_4_pruning_and_a_mode_with_a_2_4_kernel():
    two_four = {"method": "magnitude", "pattern": "2:4"}
    with pytest.raises(ConfigError, match="semi_structured needs 2:4 pruning"):
        PipelineConfig.validated({"prune": {"method": "magnitude", "ratio": 0.5}, "quant": {"mode": "none", "semi_structured": True}})
    with pytest.raises(ConfigError, match="no 2:4 kernel for int8_weight_only"):
        PipelineConfig.validated({"prune": two_four, "quant": {"semi_structured": True}})
    for mode in ("none", "float8_dynamic"):
        assert PipelineConfig.validated({"prune": two_four, "quant": {"mode": mode, "semi_structured": True}}).quant.semi_structured
