import pytest
import torch
from torch import nn

from gemma_opt.config import PruneConfig
from gemma_opt.filtering import FilterMap
from gemma_opt.pruning import GradualPruner, layer_norm_masks, magnitude_masks, n_m_mask, prune, smallest_masks


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
