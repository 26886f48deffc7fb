from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torchao.quantization import Int8Tensor
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

from gemma_opt.compilation import WholeRowReductions, compile_counters, grouped_attention, with_choices
from gemma_opt.config import ConfigError, PipelineConfig, PruneConfig, QuantConfig
from gemma_opt.filtering import build_filter_map
from gemma_opt.generation import (SamplingParams, _sampler, blockwise_argmax, build_inputs, candidates,
                                  generate_text, stream)
from gemma_opt.int8_gemv import OutputColumns, fuse_projections, use_int8_gemv
from gemma_opt.int8_gemv import supported as int8_gemv_supported
from gemma_opt.models import load_model
from gemma_opt.pipeline import optimize
from gemma_opt.pruning import prune
from gemma_opt.quantization import expected_int8_bytes, quantize, weight_bytes

NEEDS_CPU_KERNELS = pytest.mark.skipif(not int8_gemv_supported("cpu"), reason="the INT8 GEMV kernel needs AVX-512 or AVX2")
ON_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
    assert "decode step" in report.compiled and any("vision_tower" in n for n in report.compiled)
    assert report.prune.overall == pytest.approx(0.3, abs=0.01)
    assert report.weight_bytes_after < report.weight_bytes_before
    image = Image.new("RGB", (120, 90), (200, 30, 30))
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    graphs = compile_counters().get("unique_graphs")
    assert graphs  # the warm-up compiled
    outputs = [generate_text(tiny, prompt, picture, SamplingParams(max_new_tokens=n, temperature=0))
               for prompt, picture, n in [("What colour is this?", image, 5), ("Hi", None, 3),
                                          ("Describe the picture in detail, please. " * 12, image, 90)]]
    assert all(outputs)
    assert compile_counters().get("unique_graphs") == graphs, "a request recompiled"
    assert generate_text(tiny, "What colour is this?", image, greedy) == generate_text(tiny, "What colour is this?", image, greedy)


def test_a_cpu_setup_sends_no_image_through_a_tower_it_did_not_compile_and_an_image_then_compiles_nothing(tiny):
    """On a CPU the warm-up's image would only cost every boot a pass through the tower."""
    images = []
    tiny.model.model.vision_tower.register_forward_hook(lambda *args: images.append(1))
    optimize(tiny, PipelineConfig.validated({"model": "tiny-random"}))
    assert images == [], "the warm-up sent an image through the tower"
    graphs = compile_counters().get("unique_graphs")
    image = Image.new("RGB", (120, 90), (200, 30, 30))
    assert generate_text(tiny, "What colour is this?", image, SamplingParams(max_new_tokens=5, temperature=0))
    assert images == [1] and compile_counters().get("unique_graphs") == graphs, "an image request compiled"


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
    assert report.weight_bytes_after < 4.8e9  # the bound with the head quantized
    assert weight_bytes(loaded.model) == report.weight_bytes_after


def test_int8_head_is_one_shared_table_and_keeps_the_logits(tiny):
    model = tiny.model
    ids = torch.tensor([[2, 17, 260, 1000, 31]])
    with torch.inference_mode():
        dense_logits = model(input_ids=ids).logits.float()
    head = model.get_output_embeddings()
    rows, cols = head.weight.shape
    before = weight_bytes(model)
    quantize(model, build_filter_map(model), QuantConfig(head=True))
    assert isinstance(head.weight, Int8Tensor) and model.get_input_embeddings().weight is head.weight
    saved = lambda n, r: 2 * n - (n + 5 * r)  # bf16 -> int8 plus an fp32 scale and int8 zero point per row
    linears = sum(saved(m.weight.numel(), m.weight.shape[0]) for m in build_filter_map(model).modules.values())
    assert before - weight_bytes(model) == saved(rows * cols, rows) + linears  # one table, not a second copy
    with torch.inference_mode():
        logits = model(input_ids=ids).logits.float()
        hidden = model.model(input_ids=ids).last_hidden_state.float()
    from_table = hidden @ head.weight.dequantize().float().T  # the shared INT8 table, bf16 rounding apart
    assert (logits - from_table).abs().max() < 0.01 * from_table.abs().max()  # measured: 0.5%
    assert (logits - dense_logits).abs().max() < 0.05 * dense_logits.abs().max()  # measured: 3.8%
    # No top-1 comparison: a random model's best logits tie in bf16. The real 270M's quality with
    # the INT8 head is in test_quality_270m.py.


@pytest.mark.parametrize("int8_gemv", [pytest.param(True, marks=NEEDS_CPU_KERNELS), False])
def test_compiled_int8_decode_runs_one_int8_kernel_per_matrix_and_our_attention_kernel(tiny, int8_gemv):
    from torch._dynamo.utils import counters
    from torch.profiler import profile

    torch._dynamo.reset()  # compile from scratch: graphs of earlier tests may be reused otherwise
    before = counters["inductor"]["woq_matcher_count"]
    config = {"model": "tiny-random", "quant": {"head": True},
              "compile": {"int8_gemv": int8_gemv, "decode_attention": int8_gemv}}  # our kernels, or none
    # inductor's caches would skip the lowering for graphs earlier tests already compiled
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        report = optimize(tiny, PipelineConfig.validated(config))
    with profile() as prof:
        generate_text(tiny, "Hello", params=SamplingParams(max_new_tokens=5, temperature=0, stop_at_eos=False))
    calls = {e.key: e.count for e in prof.key_averages()}
    linears = 4 * 7 + 1  # seven in each of 4 layers, and the head
    assert calls["aten::scaled_dot_product_attention"] == 4  # the prompt's, in each layer; never a decoded token's
    if int8_gemv:  # ours in the four decode steps after the prefill's token, and the prefill's head (one row)
        assert f"INT8 GEMV kernel ({linears} linears)" in report.compiled
        assert "fused q/k/v and gate/up projections (8 modules)" in report.compiled
        calls_per_step = 4 * 4 + 1  # q/k/v, o, gate/up and down in each layer, and the head
        assert calls["gemma_opt::int8_gemv"] == 4 * calls_per_step + 1 and "aten::_weight_int8pack_mm" not in calls
        assert "decode-attention kernel (cpu)" in report.compiled
        assert calls["gemma_opt::decode_attention"] == 4 * 4  # each layer of the four decode steps
    else:  # inductor rewrote torchao's int8 weight-only linears into ATen's kernel
        assert counters["inductor"]["woq_matcher_count"] - before >= linears
        assert calls["aten::_weight_int8pack_mm"] == 4 * linears and "gemma_opt::int8_gemv" not in calls
        assert "gemma_opt::decode_attention" not in calls


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=NEEDS_CPU_KERNELS), pytest.param("cuda", marks=ON_GPU)])
def test_fused_projections_give_the_same_outputs_from_one_matrix_for_q_k_v_and_one_for_gate_up(device):
    tiny = load_model("tiny-random", device, dtype=torch.float32)
    model = tiny.model
    assert fuse_projections(model) == 0  # nothing on our INT8 kernel: nothing to fuse
    quantize(model, build_filter_map(model), QuantConfig(head=True))
    use_int8_gemv(model)
    size, names = weight_bytes(model), set(model.state_dict())
    prompt, token = torch.tensor([[2, 17, 260, 1000, 31, 9]], device=device), torch.tensor([[2]], device=device)
    with torch.inference_mode():
        before = [model(input_ids=ids).logits for ids in (prompt, token)]  # prefill rows; one decoded row
        assert fuse_projections(model) == 4 + 4  # the attention and the MLP of each layer
        after = [model(input_ids=ids).logits for ids in (prompt, token)]
    torch.testing.assert_close(after[0], before[0])  # several rows: torchao's linear on the fused matrix
    torch.testing.assert_close(after[1], before[1])  # one row: our kernel
    layer = model.model.language_model.layers[0]
    assert all(isinstance(getattr(layer.self_attn, n), OutputColumns) for n in ("q_proj", "k_proj", "v_proj"))
    assert layer.self_attn.fused_proj.weight.shape == (2 * 32 + 2 * 32, 64)  # 2 query heads, 1 KV head, of 32
    assert layer.mlp.fused_proj.weight.shape == (2 * 128, 64)
    assert weight_bytes(model) == size  # the matrices moved, none is kept twice
    fused = {n for n in names if n.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
             and "vision" not in n}
    assert fused == names - set(model.state_dict())


def test_streamed_pieces_join_to_the_tokenizer_s_decode_of_generate_s_tokens():
    """The real 270M (a base model: it echoes the prompt) writes 𓀀, four byte tokens: the streamed text is
    what transformers' generate() and decode give, never a broken character."""
    real = load_model("gemma-3-270m")
    inputs = build_inputs(real, "Repeat after me: the treble clef 𓀀 and 𝄞.", max_new_tokens=40)
    ids = real.model.generate(**inputs, max_new_tokens=40, do_sample=False, eos_token_id=real.eos_token_ids)
    expected = real.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    pieces = list(stream(real, inputs, SamplingParams(max_new_tokens=40, temperature=0)))
    assert "".join(pieces) == expected and "𓀀" in expected
    assert len(pieces) > 10 and not any("\ufffd" in piece for piece in pieces)


def test_a_blank_system_prompt_is_no_system_prompt(tiny):
    """The web form's field with a stray space or newline: Gemma's template would put it, and a blank line,
    before the question."""
    alone = build_inputs(tiny, "Hi")["input_ids"]
    assert all(torch.equal(build_inputs(tiny, "Hi", system_prompt=blank)["input_ids"], alone) for blank in [" ", "\n\t"])
    told = build_inputs(tiny, "Hi", system_prompt="Be brief.")["input_ids"]
    assert "Be brief.\n\nHi" in tiny.tokenizer.decode(told[0])


@NEEDS_CPU_KERNELS
def test_the_int8_gemv_kernel_decodes_as_torchao_int8_does_eagerly():
    tiny = load_model("tiny-random", dtype=torch.float32)  # fp32: no bf16 rounding differences
    quantize(tiny.model, build_filter_map(tiny.model), QuantConfig(head=True))
    greedy = SamplingParams(max_new_tokens=30, temperature=0, stop_at_eos=False)
    eager = generate_text(tiny, "Name three rivers of Europe.", params=greedy)
    optimize(tiny, PipelineConfig.validated({"model": "tiny-random", "dtype": "float32", "quant": {"mode": "none"}}))
    assert generate_text(tiny, "Name three rivers of Europe.", params=greedy) == eager


# On a GPU with CUDA graphs, and the next step queued before a token is read (the switch included).
@pytest.mark.parametrize("device, mode", [("cpu", "default"), pytest.param("cuda", "reduce-overhead", marks=ON_GPU)])
def test_a_request_that_fills_the_static_cache_goes_on_eagerly_with_the_same_text(device, mode):
    tiny = load_model("tiny-random", device, dtype=torch.float32)  # bf16 rounding differs between fused and eager kernels
    prompt = "Tell me everything. " * 10  # 60+ tokens: 96 - 60 compiled steps, then eager ones
    greedy = SamplingParams(max_new_tokens=60, temperature=0, stop_at_eos=False)
    eager = generate_text(tiny, prompt, params=greedy)
    optimize(tiny, PipelineConfig.validated({"model": "tiny-random", "dtype": "float32", "device": device,
                                             "quant": {"mode": "none"},
                                             "compile": {"cache_len": 96, "kv_bucket": 32, "mode": mode}}))
    graphs = compile_counters().get("unique_graphs")
    assert generate_text(tiny, prompt, params=greedy) == eager
    assert compile_counters().get("unique_graphs") == graphs
    # the compiled steps filled the static cache to its last position (the warm-up reaches ~25)
    assert all(layer.keys[0, :, -1].abs().sum() > 0 for layer in tiny.decode_cache.layers)
    long_prompt = "Tell me everything. " * 20  # 120+ tokens: no room in the static cache, eager from the start
    assert generate_text(tiny, long_prompt, params=greedy)
    assert compile_counters().get("unique_graphs") == graphs


@pytest.mark.parametrize("kv_heads", [1, 4])  # the 270M's one KV head, the 4B's four
@pytest.mark.parametrize("q_len", [1, 3])  # a decoded token (matmul-softmax), a prompt (SDPA, without softcap)
def test_grouped_attention_equals_transformers_eager_attention(kv_heads, q_len):
    torch.manual_seed(0)
    module = SimpleNamespace(num_key_value_groups=8 // kv_heads, training=False)
    query, key, value = torch.randn(1, 8, q_len, 16), torch.randn(1, kv_heads, 40, 16), torch.randn(1, kv_heads, 40, 16)
    blocked = torch.finfo(torch.float32).min
    mask = torch.where(torch.rand(1, 1, q_len, 40) < 0.7, 0.0, blocked)
    expected = eager_attention_forward(module, query, key, value, mask, scaling=0.25, softcap=50.0)[0]
    torch.testing.assert_close(grouped_attention(module, query, key, value, mask, scaling=0.25, softcap=50.0)[0],
                               expected)
    # a decode mask over the first 24 positions: as if the other 16 were masked out
    mask[..., 24:] = blocked
    expected = eager_attention_forward(module, query, key, value, mask, scaling=0.25)[0]
    torch.testing.assert_close(grouped_attention(module, query, key, value, mask[..., :24], scaling=0.25)[0],
                               expected)


# On a GPU: plain compile (what cog.yaml deploys), and CUDA graphs, whose outputs each run overwrites; both
# with the next step queued before a token is read. On the CPU in CUDA graphs' mode (none are recorded there):
# the GPU's step, over the whole cache.
@pytest.mark.parametrize("device, mode", [("cpu", "default"), ("cpu", "reduce-overhead"),
                                          pytest.param("cuda", "default", marks=ON_GPU),
                                          pytest.param("cuda", "reduce-overhead", marks=ON_GPU)])
def test_compiled_decode_is_one_graph_and_matches_eager_decoding_past_the_sliding_window_and_kv_buckets(device, mode):
    tiny = load_model("tiny-random", device, dtype=torch.float32)  # bf16 rounding differs between fused and eager kernels
    prompt = "Count the apples on the table, one by one. " * 5  # 50+ tokens; window 64, 40 more generated
    greedy = SamplingParams(max_new_tokens=40, temperature=0, stop_at_eos=False)
    eager = generate_text(tiny, prompt, params=greedy)  # transformers' dynamic cache, sliding layers keep 64
    before = compile_counters().get("unique_graphs", 0)
    # kv_bucket 32: the decode masks grow from 64 to 96 to 128 positions on the way (CPU; a GPU's step reads all)
    optimize(tiny, PipelineConfig.validated({"model": "tiny-random", "dtype": "float32", "device": device,
                                             "quant": {"mode": "none"}, "compile": {"kv_bucket": 32, "mode": mode}}))
    assert compile_counters().get("unique_graphs", 0) - before == 1  # first step, second step, any length
    assert generate_text(tiny, prompt, params=greedy) == eager
    assert compile_counters().get("unique_graphs", 0) - before == 1


@ON_GPU
def test_on_a_gpu_the_4b_norms_reduce_their_row_in_one_pass():
    """A decoder layer's post-attention norm, residual add and pre-feedforward norm over the 4B's
    2560 values, compiled as the decode step is on a GPU: one persistent reduction, no loops."""
    from torch._inductor.utils import run_and_get_code
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    torch.manual_seed(0)
    norms = [Gemma3RMSNorm(2560).to("cuda", torch.bfloat16) for _ in range(2)]
    for norm in norms:
        torch.nn.init.normal_(norm.weight, std=0.5)

    def layer_tail(x, residual):
        h = residual + norms[0](x)
        return h, norms[1](h)
    x, residual = torch.randn(2, 1, 1, 2560, dtype=torch.bfloat16, device="cuda")
    with torch._inductor.config.patch(fx_graph_cache=False):
        out, code = run_and_get_code(with_choices(torch.compile(layer_tail), WholeRowReductions()), x, residual)
    assert "triton_per_fused" in code[0] and "triton_red_fused" not in code[0]
    torch.testing.assert_close(out, layer_tail(x, residual))


@NEEDS_CPU_KERNELS
def test_the_whole_cache_decode_step_reads_its_masks_from_its_inputs(tiny):
    """The GPU's step (one static shape) on the CPU: built in the step's graph, a mask is built
    again for every layer's attention (34 kernels a step on the 4B on the H200); passed in, the
    layers read the one given, as the inductor code for the step shows."""
    import re

    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    config = PipelineConfig.validated({"model": "tiny-random", "quant": {"mode": "none"},
                                       "compile": {"mode": "reduce-overhead"}})
    with torch._inductor.config.patch(fx_graph_cache=False):
        _, code = run_and_get_code(optimize, tiny, config)
    masks = re.findall(r"gemma_opt\.decode_attention\.default\(\w+, \w+, \w+, (\w+),", next(
        c for c in code if "gemma_opt.decode_attention.default(" in c))
    assert len(masks) == 4 and all(re.fullmatch(r"arg\d+_1", mask) for mask in masks), masks


def test_semi_structured_2_4_on_cpu_is_a_clear_error(tiny):
    config = PipelineConfig.validated({"model": "tiny-random", "prune": {"method": "magnitude", "pattern": "2:4"},
                                       "quant": {"mode": "none", "semi_structured": True}})
    with pytest.raises(ConfigError, match="semi-structured sparse kernels .* need a CUDA GPU .* runs on cpu"):
        optimize(tiny, config)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=ON_GPU)])
def test_blockwise_argmax_is_argmax_with_ties_nan_and_a_part_block(device):
    torch.manual_seed(0)
    vocab = 262208  # the 4B's: 256 blocks of 1024 and 64 more
    cases = [torch.randn(2, vocab), torch.randn(1, vocab), torch.randn(1, vocab), torch.randn(1, vocab),
             torch.full((1, vocab), float("-inf"))]
    cases[1][0, [5001, 200000, 5000]] = 100.0  # ties: the first wins
    cases[2][0, -1] = 100.0  # in the last, part block
    cases[3][0, [7000, 3000, 9]] = torch.tensor([float("nan"), float("nan"), float("inf")])
    compiled = torch.compile(blockwise_argmax)
    for logits in cases:
        logits = logits.to(device, torch.bfloat16)
        expected = logits.argmax(-1)
        assert torch.equal(blockwise_argmax(logits), expected) and torch.equal(compiled(logits), expected)
    assert blockwise_argmax(cases[1].to(device)).item() == 5000


def transformers_warped(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution transformers' warpers give over the whole vocabulary."""
    warped = TemperatureLogitsWarper(params.temperature)(None, logits.clone())
    if params.top_k:
        warped = TopKLogitsWarper(params.top_k)(None, warped)
    return TopPLogitsWarper(params.top_p)(None, warped).softmax(-1)[0]


# nucleus of 2, 11, 1373 and 5848 of 8192 tokens: found among the first 64, 64, 4096, all
@pytest.mark.parametrize("top_k, scale", [(8, 2), (64, 1.5), (0, 6), (0, 3), (0, 1.5), (0, 0.5)])
def test_sampling_candidates_are_what_transformers_warpers_leave_of_the_vocabulary(top_k, scale):
    torch.manual_seed(0)
    logits, params = torch.randn(1, 8192) * scale, SamplingParams(temperature=0.7, top_p=0.9, top_k=top_k)
    expected = transformers_warped(logits, params)
    probs, ids = candidates(logits, params)
    got = torch.zeros_like(logits).scatter(-1, ids, probs)[0]
    assert torch.equal(got > 0, expected > 0)
    torch.testing.assert_close(got / got.sum(), expected)


@pytest.mark.parametrize("top_k, top_p", [(8, 0.9), (0, 0.9), (0, 1.0)])
def test_sampling_draws_from_transformers_warped_distribution(top_k, top_p):
    """The draws follow the distribution of the candidates above (top-k 0, top-p 1: over the
    whole vocabulary, which ``candidates`` leaves unsorted)."""
    torch.manual_seed(0)
    logits, params = torch.randn(1, 64) * 2, SamplingParams(temperature=0.7, top_p=top_p, top_k=top_k)
    expected = transformers_warped(logits, params)
    sample, draws = _sampler(params), 4000
    counts = torch.bincount(torch.cat([sample(logits, None) for _ in range(draws)]), minlength=64)
    drawn = counts > 0
    assert not drawn[expected == 0].any()  # nothing the warpers cut
    assert drawn[expected > 0.005].all()  # all that 4,000 draws should show (20 draws expected)
    assert (counts / draws - expected).abs().max() < 0.03


@ON_GPU
def test_sampling_on_a_gpu_never_waits_for_it():
    """stream() queues the next step before a token is read; a sampler that synchronises
    (torch.multinomial checks its input with .item()) would make the host wait instead."""
    logits = torch.randn(1, 262144, device="cuda").bfloat16()
    for top_k in (64, 0):
        sample = _sampler(SamplingParams(top_k=top_k))
        sample(logits, None)  # first calls may synchronise (allocator, library loading)
        torch.cuda.set_sync_debug_mode("error")
        try:
            sample(logits, None)
        finally:
            torch.cuda.set_sync_debug_mode(0)
