"""The serving core: whichever thread a request arrives on, the model runs on the service's own thread;
each model (the default, each variant) keeps its own compiled decode step; a request's image is read as
a viewer shows it."""

import copy
import gc
import threading
import weakref

import numpy as np
import pillow_heif
import pytest
import torch
from PIL import ExifTags, Image, ImageDraw

from gemma_opt.compilation import compile_counters
from gemma_opt.config import ConfigError, PipelineConfig
from gemma_opt.generation import GenerationStats, InputError, SamplingParams
from gemma_opt.service import Service, open_image


@pytest.fixture(scope="module")
def service():
    return Service(PipelineConfig.validated({"model": "tiny-random", "compile": {"mode": "none"}}))


def ask(service, loaded, prompt, image=None, system_prompt=None, params=None, stats=None):
    """The streamed answer, as predict.py asks for it: inputs from ``prepare``, then ``generate``."""
    params = params or SamplingParams(max_new_tokens=4)
    inputs = service.prepare(prompt, image, system_prompt, params.max_new_tokens)
    return service.generate(loaded, inputs, params, stats or GenerationStats())


def in_new_thread(fn):
    """fn() on a fresh thread, as coglet runs each prediction; its result, or its exception re-raised."""
    result = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as e:  # handed back to the caller
            result["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_requests_from_any_thread_run_the_model_on_the_setup_thread(service):
    model_thread = service.thread.call(threading.get_ident)
    assert model_thread != threading.get_ident()
    ran_on = []

    def answer(loaded):
        hook = loaded.model.register_forward_pre_hook(lambda *_: ran_on.append(threading.get_ident()))
        stats = GenerationStats()
        try:
            text = "".join(ask(service, loaded, "Hello", params=SamplingParams(max_new_tokens=5), stats=stats))
        finally:
            hook.remove()
        return text, stats.output_tokens, threading.get_ident()

    default = service.default[0]
    asked_from = []
    for _ in range(3):
        text, tokens, caller = in_new_thread(lambda: answer(default))
        assert text and tokens == 5
        asked_from.append(caller)
    variant = in_new_thread(lambda: service.get("magnitude", 0.3, "int8_weight_only"))[0]
    assert variant.model is not default.model
    in_new_thread(lambda: answer(variant))
    assert len(ran_on) == 4 * 5  # a prefill and four decode steps per request
    assert set(ran_on) == {model_thread} and model_thread not in asked_from


def test_errors_on_the_model_thread_reach_the_caller_and_it_keeps_serving(service):
    loaded = service.default[0]
    def fails_midway():
        yield "a piece"
        raise RuntimeError("out of memory, say")

    pieces = service.thread.iterate(fails_midway)
    assert next(pieces) == "a piece"
    with pytest.raises(RuntimeError, match="out of memory, say"):
        next(pieces)
    with pytest.raises(InputError, match="exceeds this model's context"):
        service.prepare("word " * 5000, None, None, 4)
    # Gemma's image markers typed into a prompt: transformers' processor failed with a ValueError about counts
    image = Image.new("RGB", (64, 64), "red")
    for prompt, system_prompt, picture in [("What is <start_of_image>?", None, None), ("Hi", "<start_of_image>", None),
                                           ("Look: <image_soft_token>", None, image)]:
        with pytest.raises(InputError, match="Gemma's marker for where an image goes"):
            service.prepare(prompt, picture, system_prompt, 4)
    for blank in ["", " \n\t"]:  # the web form's empty field; the service's own check, as coglet's accepts it
        with pytest.raises(InputError, match="the prompt is empty"):
            service.prepare(blank, None, "Be brief.", 4)
    assert "".join(ask(service, loaded, "", image))
    assert "".join(ask(service, loaded, "Hi"))
    with pytest.raises(InputError, match=r"sparsity_method 'wanda' with sparsity_ratio 0.0: .*ratio must be within"):
        service.get("wanda", 0.0, "int8_weight_only")  # the web form's ratio when the deployment prunes nothing
    cached = service.get("magnitude", 0.3, "int8_weight_only")
    with pytest.raises(ConfigError, match="int4_weight_only is not supported by torchao .* on cpu"):
        service.get("wanda", 0.5, "int4_weight_only")  # the web form offers it; torchao runs it on CUDA only
    assert service.get("magnitude", 0.3, "int8_weight_only") is cached  # still cached: not evicted, not rebuilt


def test_closing_the_stream_stops_generation_on_the_model_thread(service):
    stats = GenerationStats()
    pieces = ask(service, service.default[0], "Tell me everything.",
                 params=SamplingParams(max_new_tokens=2000, stop_at_eos=False), stats=stats)
    next(pieces)
    pieces.close()
    service.thread.call(lambda: None)  # the model thread has finished what it was doing
    assert 1 <= stats.output_tokens < 2000


@pytest.mark.slow
def test_each_variant_compiles_its_own_decode_step_whatever_dynamo_s_recompile_limit():
    """dynamo counts graphs per code object against its recompile limit (8), and every model's
    forward is the same code: shared, a long-lived service's variants used it up and then a new
    one failed to compile. At a limit of 1, two new weight formats still compile and serve."""
    greedy = SamplingParams(max_new_tokens=4, temperature=0)
    service = Service(PipelineConfig.validated({"model": "tiny-random"}))  # INT8, decode step compiled
    service.thread.call(setattr, torch._dynamo.config, "recompile_limit", 1)  # torch's config is per thread
    graphs, built = compile_counters()["unique_graphs"], []
    for sparsity, ratio, quantization in [("none", 0.0, "none"), ("magnitude", 0.2, "float8_weight_only")]:
        loaded = service.get(sparsity, ratio, quantization)[0]
        assert loaded.decode_step is not service.default[0].decode_step
        assert "".join(ask(service, loaded, "Hi", params=greedy))
        built.append(weakref.ref(loaded.model))
    assert compile_counters()["unique_graphs"] == graphs + 2
    del loaded
    gc.collect()
    assert built[0]() is None and built[1]() is not None  # one extra variant kept; dynamo holds no weights
    assert "".join(ask(service, service.default[0], "Hi", params=greedy))
    assert compile_counters()["unique_graphs"] == graphs + 2  # the default kept its graph


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["int4_weight_only", "float8_weight_only", "float8_dynamic"])
def test_on_a_gpu_each_quantization_the_web_form_offers_builds_and_decodes(service, mode):
    """torchao's tensors for the modes the web form offers beside INT8, each built into a
    served variant and decoding; a linear's output stays near the dense one's."""
    if mode.startswith("float8") and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs compute capability 8.9 (L40S, H100)")
    loaded = service.get("none", 0.0, mode)[0]
    stats, greedy = GenerationStats(), SamplingParams(max_new_tokens=4, temperature=0, stop_at_eos=False)
    assert "".join(ask(service, loaded, "Hi", params=greedy, stats=stats))
    assert stats.output_tokens == 4
    name = next(n for n, _ in loaded.model.named_modules() if n.endswith("layers.0.mlp.gate_proj"))
    quantized, dense = loaded.model.get_submodule(name), copy.deepcopy(service.pristine.get_submodule(name)).cuda()
    assert type(quantized.weight).__name__ == {"int4_weight_only": "Int4TilePackedTo4dTensor"}.get(mode, "Float8Tensor")
    x = torch.randn(3, dense.in_features, device="cuda", dtype=dense.weight.dtype)
    expected = dense(x)
    assert (quantized(x) - expected).norm() / expected.norm() < 0.25  # int4's rounding alone: ~0.09 here


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_images_are_seen_on_white_as_a_viewer_shows_them(tmp_path, mode):
    """A black mark on a transparent background (a logo, a diagram) must not become black on black."""
    image = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    ImageDraw.Draw(image).rectangle([8, 8, 23, 23], fill=(0, 0, 0, 255))
    path = tmp_path / "mark.png"
    image.convert(mode).save(path)
    assert Image.open(path).mode == mode

    pixels = np.asarray(open_image(path))
    assert pixels.shape == (32, 32, 3)
    assert (pixels[0, 0] == 255).all() and (pixels[16, 16] == 0).all()


def test_photos_are_turned_upright_by_their_exif_orientation(tmp_path):
    """Phones store a portrait photo as landscape pixels plus an orientation tag (6: turn 90° clockwise)."""
    image = Image.new("RGB", (40, 20), "blue")
    ImageDraw.Draw(image).rectangle([0, 0, 19, 19], fill="red")  # left half
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    path = tmp_path / "portrait.jpg"
    image.save(path, exif=exif)

    upright = open_image(path)
    assert upright.size == (20, 40)
    top, bottom = np.asarray(upright)[5, 10], np.asarray(upright)[35, 10]
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # the left half is now on top


def test_16_bit_grey_images_keep_their_tones(tmp_path):
    """16-bit grey PNG and TIFF (scans, X-rays): Pillow's own conversion clips them at 255, nearly all white."""
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "scan.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"

    pixels = np.asarray(open_image(path)).astype(int)
    assert np.abs(pixels[..., 0] - ramp // 256).max() <= 1 and (pixels[..., 0] == pixels[..., 2]).all()


def test_iphone_photos_in_heic_are_read(tmp_path):
    """HEIC is what iPhones store photos in; Pillow alone cannot read it."""
    path = tmp_path / "IMG_0001.HEIC"
    pillow_heif.from_pillow(Image.new("RGB", (48, 32), (200, 30, 30))).save(path)

    pixels = np.asarray(open_image(path)).astype(int)
    assert pixels.shape == (32, 48, 3) and np.abs(pixels - [200, 30, 30]).max() < 12  # lossy


def test_a_48_megapixel_phone_photo_is_read_at_the_size_the_model_sees(service, tmp_path):
    """Phones take 48-200 MP photos; a JPEG is decoded at the smallest DCT scale that keeps both
    sides at least the model's image size (Gemma 3: 896), not in full."""
    path = tmp_path / "IMG_0002.jpg"
    Image.new("RGB", (8064, 6048), (30, 90, 200)).save(path, quality=90)
    assert open_image(path).size == (8064, 6048)  # in full without a size: a photo, not a decompression bomb
    assert open_image(path, 896).size == (2016, 1512)  # a quarter of each side: an eighth would be under 896
    assert service.image_size == 64  # the tiny model's processor: what predict.py passes
    image_processor = service.default[0].processor.image_processor
    default, image_processor.do_pan_and_scan = image_processor.do_pan_and_scan, True  # crops, each seen at 64 x 64
    try:
        assert service.image_size is None  # the image read in full
    finally:
        image_processor.do_pan_and_scan = default
    picture = open_image(path, service.image_size)
    assert picture.size == (1008, 756) and picture.mode == "RGB"  # an eighth, the DCT's smallest
    assert np.abs(np.asarray(picture).astype(int) - [30, 90, 200]).max() < 8
