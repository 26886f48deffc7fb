"""What one image costs in the 4B architecture's vision tower (SigLIP, random weights) on this
CPU: in bf16, in float32, and as the pipeline runs it (``float32_math_``: bf16 weights, float32
math where oneDNN has no bf16 kernels; elsewhere plain bf16). The tower is not quantized in
the default pipeline (the filter leaves it out).

    .venv/bin/python scripts/vision_tower_speed.py                        # ~3 minutes
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python scripts/vision_tower_speed.py

The second line runs it as on a CPU with AVX2 only (docs/speed.md); ~5 minutes.
One 896 x 896 image, timed on its second call.
"""

import copy
import time

import torch
from transformers.models.siglip.modeling_siglip import SiglipVisionModel

from gemma_opt.cpu_matmul import float32_math_
from gemma_opt.models import gemma_3_4b_config

torch.manual_seed(0)
bf16 = SiglipVisionModel(gemma_3_4b_config().vision_config).eval().to(torch.bfloat16)
pipeline = copy.deepcopy(bf16)  # the three towers hold the same (bf16) weights
swapped = float32_math_(pipeline)
print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, oneDNN bf16 kernels: "
      f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}; the pipeline gives {swapped} modules float32 math")
pixels = torch.randn(1, 3, 896, 896)
for label, tower, image in [("bf16", bf16, pixels.bfloat16()), ("float32", copy.deepcopy(bf16).float(), pixels),
                            ("the pipeline's", pipeline, pixels.bfloat16())]:
    with torch.inference_mode():
        tower(pixel_values=image)
        start = time.perf_counter()
        tower(pixel_values=image)
        seconds = time.perf_counter() - start
    print(f"{label:>14}: one 896x896 image through the vision tower in {seconds:.2f} s", flush=True)
