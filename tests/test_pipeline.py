import pytest
import torch
from PIL import Image
from torchao.quantization import Int8Tensor

from gemma_opt.compilation import compile_counters
from gemma_opt.config import PipelineConfig, PruneConfig, QuantConfig
from gemma_opt.filtering import build_filter_map
from gemma_opt.generation import SamplingParams, generate_text
from gemma_opt.models import load_model
from gemma_opt.pipeline import optimize
from gemma_opt.pruning import prune
from gemma_opt.quantization import expected_int8_bytes, quantize, weight_bytes


def test_default_filter_map_is_the_decoder_linears(tiny):
    names = list(build_filter_map(tiny.model).modules)
    assert len(names) == 4 * 7
    assert all("language_model.layers." in n and n.endswith("_proj") for n in names)


def test_pruned_zeros_stay_exactly_zero_after_int8(tiny):
    fmap = build_filter_map(tiny.model)
    prune(tiny.model, fmap, PruneConfig(method="magnitude", ratio=0.4))
    masks = {n: m.weight == 0 for n, m in fmap.modules.items()}
    quantize(tiny.model, fmap, QuantConfig(mode="int8_weight_only"))
    for name, module in fmap.modules.items():
        assert isinstance(module.weight, Int8Tensor)
        assert (module.weight.qdata[masks[name]] == 0).all()
        assert (module.weight.dequantize()[masks[name]] == 0).all()


def test_tiny_multimodal_image_and_prompt_through_every_stage(tiny):
    config = PipelineConfig.validated({
        "model": "tiny-random", "filter": {"include_vision": True},
        "prune": {"method": "magnitude", "ratio": 0.3}, "compile": {"vision": True}})
    report = optimize(tiny, config)
    assert any("vision_tower" in n for n in report.filtered)
    assert any("vision_tower" in n for n in report.compiled) and any("language_model" in n for n in report.compiled)
    assert report.prune.overall == pytest.approx(0.3, abs=0.01)
    assert report.weight_bytes_after < report.weight_bytes_before
    image = Image.new("RGB", (120, 90), (200, 30, 30))
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    graphs = compile_counters().get("unique_graphs")
    assert graphs  # the warm-up compiled
    outputs = [generate_text(tiny, prompt, image, SamplingParams(max_new_tokens=n, temperature=0))
               for prompt, n in [("What colour is this?", 5), ("Describe the picture in detail, please.", 9),
                                 ("Hi", 3)]]
    assert all(outputs)
    assert compile_counters().get("unique_graphs") == graphs, "a request recompiled"
    assert generate_text(tiny, "What colour is this?", image, greedy) == generate_text(tiny, "What colour is this?", image, greedy)


@pytest.mark.slow
def test_4b_architecture_int8_bytes_match_the_shapes():
    loaded = load_model("gemma-3-4b-arch")
    params = sum(p.numel() for p in loaded.model.parameters())
    assert 4.25e9 < params < 4.35e9
    fmap = build_filter_map(loaded.model)
    expected = expected_int8_bytes(loaded.model, fmap)
    report = optimize(loaded, PipelineConfig.validated({"compile": {"mode": "none"}}))
    print(f"4B arch: {params / 1e9:.3f}B params, bf16 {report.weight_bytes_before / 1e9:.3f} GB -> "
          f"int8 {report.weight_bytes_after / 1e9:.3f} GB (from shapes: {expected / 1e9:.3f} GB)")
    assert 8.4e9 < report.weight_bytes_before < 8.8e9
    assert abs(report.weight_bytes_after / expected - 1) < 0.01
    assert 5.0e9 < report.weight_bytes_after < 5.4e9
    assert weight_bytes(loaded.model) == report.weight_bytes_after
