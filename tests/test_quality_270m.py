"""The pipeline on the real Gemma 3 270M: perplexity on the shipped evaluation text
(never used for calibration), with bounds measured on this model."""

import copy
import json
from functools import cache

import pytest
import torch

from gemma_opt.config import SPARSITY_CHOICES, PipelineConfig
from gemma_opt.evaluation import perplexity
from gemma_opt.generation import SamplingParams, generate_text
from gemma_opt.models import LoadedModel, load_model
from gemma_opt.pipeline import optimize

pytestmark = pytest.mark.slow
UNTOUCHED = ("embed", "norm", "lm_head", "multi_modal_projector")
INT8 = "int8_weight_only"
VARIANTS = [("none", None, "none"), ("none", None, INT8)] + [
    (method, ratio, INT8) for method in ("magnitude", "gradual", "layer_norm") for ratio in (0.02, 0.3, 0.5)
] + [(method, ratio, INT8) for method, ratio in [("magnitude", 0.7), ("gradual", 0.7), ("wanda", 0.5), ("wanda", 0.7),
                                                 ("owl-wanda", 0.7), ("magnitude", "2:4"), ("wanda", "2:4")]]


@cache
def _loaded_once() -> LoadedModel:
    return load_model("gemma-3-270m")


def fresh_270m() -> LoadedModel:
    """The real 270M, untouched: a copy of one load (3-4 s a load, 0.4 s a copy; 20 are made here)."""
    base = _loaded_once()
    return LoadedModel(copy.deepcopy(base.model), base.tokenizer, base.processor, base.name)


def untouched(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if any(k in n for k in UNTOUCHED)}


def pruned(method, ratio, quant):
    """The 270M through the pipeline (no compile): the model, its untouched tensors before, the report."""
    loaded = fresh_270m()
    before = untouched(loaded.model)
    sparsity = {"pattern": ratio} if isinstance(ratio, str) else {"ratio": ratio}
    config = PipelineConfig.validated({"prune": {**SPARSITY_CHOICES[method], **sparsity},
                                       "quant": {"mode": quant, "head": False}, "compile": {"mode": "none"}})
    return loaded, before, optimize(loaded, config)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    rows, identical = {}, {}
    for method, ratio, quant in VARIANTS:
        loaded, before, report = pruned(method, ratio, quant)
        after = untouched(loaded.model)
        identical[(method, ratio, quant)] = before.keys() == after.keys() and all(
            torch.equal(before[n], after[n]) for n in before)
        rows[(method, ratio, quant)] = perplexity(loaded.model, loaded.tokenizer)
        print(f"{method:10} {ratio!s:5} {quant:17} ppl={rows[(method, ratio, quant)]:.3f} "
              f"sparsity={report.prune.overall:.3f} prune_s={report.prune.seconds:.1f}")
    (tmp_path_factory.getbasetemp() / "quality_270m.json").write_text(json.dumps({str(k): v for k, v in rows.items()}))
    return rows, identical


def test_int8_alone_stays_within_2_percent_of_dense(table):
    rows, _ = table
    dense = rows[("none", None, "none")]
    assert 15 < dense < 40  # the real model on real text (measured: 23.08)
    assert abs(rows[("none", None, INT8)] / dense - 1) < 0.02


def test_default_int8_with_the_head_stays_within_2_percent_of_dense(table):
    rows, _ = table
    loaded = fresh_270m()
    optimize(loaded, PipelineConfig.validated({"compile": {"mode": "none"}}))  # default: the tied head is int8 too
    ppl = perplexity(loaded.model, loaded.tokenizer)
    print(f"int8 with head: ppl={ppl:.3f}")
    assert abs(ppl / rows[("none", None, "none")] - 1) < 0.02


def test_2_percent_magnitude_stays_within_1_percent(table):
    rows, _ = table
    assert abs(rows[("magnitude", 0.02, INT8)] / rows[("none", None, INT8)] - 1) < 0.01


@pytest.mark.parametrize("ratio", [0.5, 0.7])
def test_gradual_with_reconstruction_beats_one_shot_magnitude(table, ratio):
    rows, _ = table
    assert rows[("gradual", ratio, INT8)] < 0.5 * rows[("magnitude", ratio, INT8)]


def test_wanda_at_half_sparsity_costs_at_most_half_of_magnitude(table):
    rows, _ = table
    dense = rows[("none", None, "none")]
    assert rows[("wanda", 0.5, INT8)] - dense <= 0.5 * (rows[("magnitude", 0.5, INT8)] - dense)


def test_wanda_beats_magnitude_at_2_4(table):
    rows, _ = table
    assert rows[("wanda", "2:4", INT8)] < rows[("magnitude", "2:4", INT8)]


def test_owl_costs_nothing_against_uniform_wanda_at_70_percent(table):
    """OWL's effect at 70% depends on the CPU (the bf16 calibration's numerics), in either direction:
    411 vs uniform 450 on an AMD EPYC VM with AVX-512, 449 vs 443 on an Intel Xeon, 442 vs 451 on an
    AMD EPYC without it; even the mirrored allocation (more pruning where the outliers are) was worse
    on the Xeon (470) and better without AVX-512 (423). What held on all three: within 5% of uniform.
    That OWL's ratios follow the outliers is tested on the allocation itself (tests/test_pruning.py)."""
    rows, _ = table
    assert rows[("owl-wanda", 0.7, INT8)] < 1.05 * rows[("wanda", 0.7, INT8)]


def test_quality_degrades_with_sparsity(table):
    rows, _ = table
    for method in ("magnitude", "gradual", "layer_norm"):
        ppl = [rows[(method, r, INT8)] for r in (0.02, 0.3, 0.5)]
        assert ppl == sorted(ppl), (method, ppl)


def test_embeddings_norms_and_head_are_bit_identical(table):
    _, identical = table
    assert all(identical.values()), [k for k, v in identical.items() if not v]


def test_int8_greedy_generation_starts_like_dense():
    prompt = "The three primary colours are"
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    dense, int8 = fresh_270m(), fresh_270m()
    optimize(int8, PipelineConfig.validated({"compile": {"mode": "none"}}))
    first = lambda loaded: loaded.tokenizer(generate_text(loaded, prompt, params=greedy)).input_ids[:6]
    assert first(int8) == first(dense)
