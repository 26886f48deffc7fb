"""Half-precision linears and convolutions on a CPU without fast kernels for them compute in
float32. The Makefile's third pass runs this file as on a CPU with AVX2 only, where the
pipeline swaps the vision tower's modules; on a CPU with oneDNN's bf16 kernels it swaps none."""

import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torchao.quantization import Int8WeightOnlyConfig, quantize_

from gemma_opt.config import PipelineConfig
from gemma_opt.cpu_matmul import CPU_MATMUL_DTYPE, Float32MathConv2d, Float32MathLinear, float32_math_
from gemma_opt.generation import SamplingParams, generate_text
from gemma_opt.models import load_model
from gemma_opt.pipeline import optimize

BF16 = torch.bfloat16
UPCAST = {BF16: torch.float32, torch.float16: torch.float32}


def test_float32_math_swaps_plain_half_modules_only_and_keeps_their_weights():
    torch.manual_seed(0)
    model = nn.ModuleDict({"conv": nn.Conv2d(3, 8, 4, stride=4), "linear": nn.Linear(64, 32),
                           "int8": nn.Linear(64, 32), "fp32": nn.Linear(64, 32)})
    model.requires_grad_(False)
    for name in ("conv", "linear", "int8"):
        model[name].to(BF16)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, name: name == "int8")
    keys, parameters = model.state_dict().keys(), dict(model.named_parameters())
    assert float32_math_(model, {BF16: BF16}) == 0  # a CPU with oneDNN's bf16 kernels
    assert float32_math_(model, UPCAST) == 2
    assert (type(model["conv"]), type(model["linear"])) == (Float32MathConv2d, Float32MathLinear)
    assert (type(model["int8"]), type(model["fp32"])) == (nn.Linear, nn.Linear)
    assert model.state_dict().keys() == keys
    assert all(p is parameters[name] for name, p in model.named_parameters())

    linear, conv = model["linear"], model["conv"]
    prompt, token = torch.randn(2, 5, 64, dtype=BF16), torch.randn(1, 1, 64, dtype=BF16)
    expected = F.linear(prompt.float(), linear.weight.float(), linear.bias.float()).to(BF16)
    assert torch.equal(linear(prompt), expected)  # rounded once, from float32
    assert torch.equal(linear(token), F.linear(token, linear.weight, linear.bias))  # a GEMV in bf16, as before
    image = torch.randn(1, 3, 16, 16, dtype=BF16)
    expected = F.conv2d(image.float(), conv.weight.float(), conv.bias.float(), stride=4).to(BF16)
    assert torch.equal(conv(image), expected)
    step = torch.compile(linear, fullgraph=True)  # inside the compiled decode step, as for a bf16 LM's linears
    assert torch.equal(step(token), linear(token)) and torch.equal(step(prompt), linear(prompt))


def test_large_weights_are_converted_into_one_shared_buffer_and_small_ones_are_not():
    """A weight over 32 MB in float32 (the 4B's gate/up and down) would get fresh pages at every
    conversion: the model's large linears convert into one buffer, refilled for each."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"gate": nn.Linear(2048, 4100), "down": nn.Linear(4100, 2048, bias=False),
                           "small": nn.Linear(64, 32)}).to(BF16).requires_grad_(False)
    assert float32_math_(model, UPCAST) == 3
    gate, down, small = model["gate"], model["down"], model["small"]
    assert gate.dequant is down.dequant is small.dequant and gate.dequant.buffer is None
    x = torch.randn(3, 2048, dtype=BF16)
    for _ in range(2):  # each conversion refills the buffer the other one used
        hidden = gate(x)
        assert torch.equal(hidden, F.linear(x.float(), gate.weight.float(), gate.bias.float()).to(BF16))
        assert torch.equal(down(hidden), F.linear(hidden.float(), down.weight.float()).to(BF16))
    buffer = gate.dequant.buffer
    assert buffer.dtype == torch.float32 and buffer.numel() == gate.weight.numel()
    small(torch.randn(2, 64, dtype=BF16))
    assert gate.dequant.buffer is buffer  # a small weight converts into a tensor of its own


def test_the_pipeline_gives_the_vision_tower_float32_math_where_this_cpu_lacks_bf16_kernels():
    tiny = load_model("tiny-random")
    report = optimize(tiny, PipelineConfig.validated({"model": "tiny-random", "compile": {"mode": "none"}}))
    tower = tiny.model.model.vision_tower
    modules = [m for m in tower.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    upcast = CPU_MATMUL_DTYPE.get(BF16) == torch.float32
    assert all(isinstance(m, (Float32MathLinear, Float32MathConv2d)) == upcast for m in modules)
    assert any(f"float32 math for {len(modules)} half-precision" in c for c in report.compiled) == upcast
    assert all(p.dtype == BF16 for p in tower.parameters())  # no weight memory added
    image = Image.new("RGB", (120, 90), (200, 30, 30))
    assert generate_text(tiny, "What colour is this?", image, SamplingParams(max_new_tokens=4, temperature=0))
