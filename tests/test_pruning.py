import pytest
import torch
from torch import nn

from gemma_opt.config import ConfigError, FilterConfig, PipelineConfig, PruneConfig
from gemma_opt.filtering import FilterMap, build_filter_map
from gemma_opt.generation import SamplingParams, generate_text
from gemma_opt.models import load_model
from gemma_opt.pipeline import optimize
from gemma_opt.quantization import weight_bytes
from gemma_opt.pruning import (GradualPruner, apply_masks_, calibrated_blocks, calibration_batches, input_hessians,
                               inverse_hessian_factor, layer_norm_masks, magnitude_masks, n_m_mask, owl_allocation, prune,
                               reconstruct, smallest_masks, wanda_masks)


def test_smallest_masks_is_exact_with_ties_and_across_tensors():
    torch.manual_seed(0)
    a = torch.randint(0, 5, (300, 70)).to(torch.bfloat16)  # heavy ties
    b = torch.rand(50, 33)
    for k in (0, 1, 777, 10_000, a.numel() + b.numel()):
        ma, mb = smallest_masks([a, b], k)
        assert int(ma.sum() + mb.sum()) == k
        if 0 < k < a.numel() + b.numel():  # everything selected is <= everything not selected
            chosen = torch.cat([a[ma].float(), b[mb].float()])
            rest = torch.cat([a[~ma].float(), b[~mb].float()])
            assert chosen.max() <= rest.min()


def linear(rows, cols, seed=0):
    torch.manual_seed(seed)
    m = nn.Linear(cols, rows, bias=False, dtype=torch.bfloat16)
    nn.init.normal_(m.weight)
    return m


def test_per_layer_and_global_magnitude_hit_the_target():
    mods = {"a": linear(64, 48), "b": linear(32, 80, seed=1)}
    mods["b"].weight.data *= 3  # global pruning should then take more from "a"
    for name, mask in magnitude_masks(mods, 0.3).items():
        assert abs(int(mask.sum()) - round(0.3 * mask.numel())) <= 1
    masks = magnitude_masks(mods, 0.3, "global")
    assert int(sum(m.sum() for m in masks.values())) == round(0.3 * (64 * 48 + 32 * 80))
    assert masks["a"].float().mean() > 0.4 > masks["b"].float().mean()


@pytest.mark.slow
def test_magnitude_on_an_lm_head_sized_matrix_stays_exact():
    head = torch.randn(262_208, 2560, dtype=torch.bfloat16)  # gemma-3-4b's tied head: 671M weights
    (mask,) = smallest_masks([head.abs()], round(0.5 * head.numel()))
    assert int(mask.sum()) == round(0.5 * head.numel())


def test_magnitude_on_a_4b_mlp_matrix():
    mods = {"down": linear(2560, 10240)}
    fmap = FilterMap(mods)
    report = prune(nn.Module(), fmap, PruneConfig(method="magnitude", ratio=0.37))
    assert abs(report.per_layer["down"] - 0.37) <= 1 / mods["down"].weight.numel()


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_n_m_pattern_keeps_n_of_every_m(n, m):
    w = linear(16, 64).weight.detach()
    mask = n_m_mask(w.abs(), n, m)
    assert (mask.view(16, -1, m).sum(-1) == m - n).all()
    pruned_max = w.abs().float().masked_fill(~mask, -1).view(16, -1, m).max(-1).values
    kept_min = w.abs().float().masked_fill(mask, float("inf")).view(16, -1, m).min(-1).values
    assert (pruned_max <= kept_min).all()  # the smallest of each group went


def test_layer_norm_removes_whole_neurons_and_never_residual_rows():
    mods = {f"layers.0.mlp.{p}": linear(*shape, seed=i) for i, (p, shape) in
            enumerate([("gate_proj", (32, 16)), ("up_proj", (32, 16)), ("down_proj", (16, 32))])}
    mods["layers.0.self_attn.q_proj"] = linear(24, 16, seed=5)
    mods["layers.0.self_attn.o_proj"] = linear(16, 24, seed=6)
    masks = layer_norm_masks(mods, 0.25)
    gate, up, down = (masks[f"layers.0.mlp.{p}"] for p in ("gate_proj", "up_proj", "down_proj"))
    neurons = gate.all(1)
    assert int(neurons.sum()) == 8
    assert torch.equal(neurons, up.all(1)) and torch.equal(neurons, down.all(0))
    assert torch.equal(gate.any(1), neurons)  # whole rows or nothing
    assert int(masks["layers.0.self_attn.q_proj"].all(1).sum()) == 6  # q: output rows
    o = masks["layers.0.self_attn.o_proj"]
    assert int(o.all(0).sum()) == 6 and not o.all(1).any()  # o: input columns, no residual row


def test_gradual_schedule_is_cubic_and_masks_nest_and_stay_applied():
    mod = linear(64, 64)
    pruner = GradualPruner({"w": mod}, final=0.6, steps=4)
    assert [round(pruner.ratio_at(t), 4) for t in range(5)] == [0.0, 0.3469, 0.525, 0.5906, 0.6]
    previous = torch.zeros(64, 64, dtype=torch.bool)
    for _ in range(4):
        ratio = pruner.step()
        mask = pruner.masks["w"]
        assert abs(int(mask.sum()) - round(ratio * mask.numel())) <= 1
        assert (previous & ~mask).sum() == 0  # nested: a pruned weight stays pruned
        previous = mask.clone()
    with torch.no_grad():  # an optimizer step that would revive pruned weights...
        mod.weight.add_(1.0)
    mod(torch.ones(1, 64, dtype=torch.bfloat16))  # ...is undone before the next forward
    assert (mod.weight[previous] == 0).all()
    pruner.remove()


def test_gradual_without_recovery_is_one_shot_magnitude():
    """Why gradual needs recovery between steps: without it the masks are the one-shot ones."""
    a, b = linear(48, 40), linear(48, 40)
    pruner = GradualPruner({"w": a}, final=0.5, steps=5)
    for _ in range(5):
        pruner.step()
    pruner.remove()
    assert torch.equal(pruner.masks["w"], magnitude_masks({"w": b}, 0.5)["w"])


def test_reconstruct_is_the_obs_update_and_sweeps_a_stack_as_each_matrix_alone():
    torch.manual_seed(0)
    x = torch.randn(3, 512, 12) @ torch.randn(3, 12, 48) + 0.1 * torch.randn(3, 512, 48)  # 3 layers' inputs, correlated
    hessians = x.mT @ x / 512
    hinv = torch.stack([inverse_hessian_factor(h) for h in hessians])
    w = torch.randn(3, 20, 48)
    # Only the first column pruned: the sweep visits it first, so every other weight of the row
    # compensates, and the result is Optimal Brain Surgeon's closed form with the damped inverse.
    first = torch.zeros(3, 20, 48, dtype=torch.bool)
    first[..., 0] = True
    damped = hessians + 0.01 * hessians.diagonal(dim1=1, dim2=2).mean(1)[:, None, None] * torch.eye(48)
    inverse = torch.linalg.inv(damped)
    obs = w - w[..., :1] * inverse[:, None, 0, :] / inverse[:, 0, 0, None, None]
    torch.testing.assert_close(reconstruct(w, first, hinv), obs, rtol=1e-4, atol=1e-4)
    mask = torch.rand(3, 20, 48) < 0.5
    stacked = reconstruct(w, mask, hinv)
    for k in range(3):
        torch.testing.assert_close(stacked[k], reconstruct(w[k], mask[k], hinv[k]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(reconstruct(w, mask, hinv, block=16), stacked, rtol=1e-5, atol=1e-5)  # across blocks
    assert (stacked[mask] == 0).all()
    output_error = lambda v, k: ((v[k] - w[k]) @ hessians[k] * (v[k] - w[k])).sum()  # ||(W - W_dense) X||^2 / n
    zeroed = w.masked_fill(mask, 0)
    assert all(output_error(stacked, k) < 0.7 * output_error(zeroed, k) for k in range(3))  # measured: 0.47-0.56


def test_wanda_prunes_the_lowest_weight_times_input_norm_of_each_row():
    mod = linear(8, 64)
    norms = torch.linspace(0.1, 10, 64) ** 2  # squared input-channel norms
    masks = wanda_masks({"w": mod}, {"w": norms}, 0.25)["w"]
    assert (masks.sum(1) == 16).all()  # per output row, exactly
    scores = mod.weight.detach().float().abs() * norms.sqrt()
    assert (scores.masked_fill(~masks, -1).max(1).values <= scores.masked_fill(masks, 1e9).min(1).values).all()
    assert not torch.equal(masks, magnitude_masks({"w": mod}, 0.25)["w"])  # the activations matter
    two_four = wanda_masks({"w": mod}, {"w": norms}, 0.5, (2, 4))["w"]
    assert torch.equal(two_four, n_m_mask(scores, 2, 4))


@pytest.mark.parametrize("exclude", [[], ["*language_model.layers.1.*"]])  # a block with nothing to prune
def test_each_block_calibrates_on_the_outputs_of_the_pruned_blocks_before_it(tiny, exclude):
    """The norms wanda sees for a block's first projection equal what the finished, pruned
    model feeds it; on the dense model they differ after the first block."""
    model = tiny.model
    fmap = build_filter_map(model, FilterConfig(exclude=exclude))
    batches = calibration_batches(tiny.tokenizer, PruneConfig(calibration_tokens=1024))
    q_projs = {n: m for n, m in fmap.modules.items() if n.endswith("q_proj")}
    dense = input_hessians(model, q_projs, batches)
    seen = {}
    for block, mods, norms in calibrated_blocks(model, fmap.modules, batches):
        apply_masks_(mods, wanda_masks(mods, norms, 0.5))
        seen.update({n: v for n, v in norms.items() if n in q_projs})
    pruned = input_hessians(model, q_projs, batches)
    tokens = sum(b.numel() for b in batches)
    names = list(q_projs)
    for name in names:
        torch.testing.assert_close(seen[name], pruned[name].diagonal() * tokens, rtol=1e-3, atol=1e-3)
    assert torch.equal(pruned[names[0]], dense[names[0]])  # nothing before the first block changed
    assert not torch.allclose(pruned[names[-1]], dense[names[-1]], rtol=1e-2)


def test_owl_ratios_follow_outliers_and_average_to_the_target():
    shares = {"b0": 0.02, "b1": 0.01, "b2": 0.0, "b3": 0.05}
    ratios = owl_allocation(shares, 0.7, 0.04)
    assert sum(ratios.values()) / 4 == pytest.approx(0.7, abs=1e-12)
    assert sorted(ratios, key=ratios.get) == ["b3", "b0", "b1", "b2"]  # more outliers, fewer pruned
    assert max(ratios.values()) - min(ratios.values()) == pytest.approx(0.08)
    low = owl_allocation(shares, 0.02, 0.04)  # the span shrinks instead of going below 0
    assert min(low.values()) >= 0 and sum(low.values()) / 4 == pytest.approx(0.02)
    assert owl_allocation({"a": 0.1, "b": 0.1}, 0.5, 0.04) == {"a": 0.5, "b": 0.5}


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_owl_pruning_hits_each_block_ratio(tiny, method):
    fmap = build_filter_map(tiny.model)
    config = PruneConfig(method=method, ratio=0.6, layer_ratios="owl", owl_lambda=0.1, calibration_tokens=1024)
    report = prune(tiny.model, fmap, config, tiny.tokenizer)
    assert len(set(report.layer_ratios.values())) == len(report.layer_ratios) > 1
    for name, sparsity in report.per_layer.items():
        assert sparsity == pytest.approx(report.layer_ratios[name.rsplit(".", 2)[0]], abs=0.01)
    assert report.overall == pytest.approx(0.6, abs=0.005)


def test_gradual_in_hessian_groups_under_the_budget_recovers_every_module(tiny):
    model = tiny.model
    fmap = build_filter_map(model)
    dense = {n: m.weight.detach().clone() for n, m in fmap.modules.items()}
    layer = sum(4 * m.in_features ** 2 for n, m in fmap.modules.items() if ".layers.0." in n)  # one layer's Hessians
    config = PruneConfig(method="gradual", ratio=0.5, calibration_tokens=1024)
    report = prune(model, fmap, config, tiny.tokenizer, hessian_budget_bytes=layer)
    assert report.unrecovered == []
    for name, mod in fmap.modules.items():
        kept = mod.weight != 0
        assert report.per_layer[name] == pytest.approx(0.5, abs=0.01)
        assert not torch.equal(mod.weight[kept], dense[name][kept])  # the surviving weights were updated


def test_calibrated_pruning_refuses_modules_outside_the_decoder_blocks(tiny):
    fmap = build_filter_map(tiny.model, FilterConfig(include_vision=True))
    with pytest.raises(ConfigError, match="outside them .*vision_tower"):
        prune(tiny.model, fmap, PruneConfig(method="wanda", ratio=0.5), tiny.tokenizer)


@pytest.mark.parametrize("method,quant", [("neurons", "none"), ("layer_norm", "int8_weight_only")])
def test_compacted_model_equals_the_masked_model(method, quant):
    masked, compacted = (load_model("tiny-random", dtype=torch.float32) for _ in range(2))
    config = {"model": "tiny-random", "dtype": "float32", "compile": {"mode": "none"}, "quant": {"mode": quant},
              "prune": {"method": method, "ratio": 0.5, "calibration_tokens": 512}}
    optimize(masked, PipelineConfig.validated(config))
    config["prune"]["compact"] = True
    report = optimize(compacted, PipelineConfig.validated(config))
    assert (report.prune.neurons_removed, report.prune.neurons_before) == (4 * 64, 4 * 128)
    mlp = compacted.model.model.language_model.layers[0].mlp
    assert mlp.gate_proj.weight.shape == (64, 64) and mlp.down_proj.weight.shape == (64, 64)
    assert report.weight_bytes_after <= weight_bytes(masked.model) - 3 * 4 * 64 * 64  # a byte or more a weight
    ids = compacted.tokenizer("Why is the sky blue? Because of Rayleigh scattering", return_tensors="pt").input_ids
    with torch.inference_mode():
        torch.testing.assert_close(compacted.model(input_ids=ids).logits, masked.model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)
    greedy = SamplingParams(max_new_tokens=12, temperature=0, stop_at_eos=False)
    assert generate_text(compacted, "Why is the sky blue?", params=greedy) == generate_text(masked, "Why is the sky blue?", params=greedy)


def test_neurons_prunes_whole_mlp_neurons_and_leaves_attention(tiny):
    fmap = build_filter_map(tiny.model)
    report = prune(tiny.model, fmap, PruneConfig(method="neurons", ratio=0.25, calibration_tokens=512), tiny.tokenizer)
    for name, module in fmap.modules.items():
        zero_rows = module.weight.eq(0).all(dim=1).sum()
        zero_cols = module.weight.eq(0).all(dim=0).sum()
        if name.endswith(("gate_proj", "up_proj")):
            assert zero_rows == 32
        elif name.endswith("down_proj"):
            assert zero_cols == 32
        else:
            assert report.per_layer[name] < 0.01  # attention untouched
