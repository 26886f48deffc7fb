"""What one image costs in the 4B architecture's vision tower (SigLIP, random weights), in bf16
and in fp32, on this CPU: the tower stays bf16 in the default pipeline (the filter leaves it
out), and on a CPU without oneDNN's bf16 kernels its matmuls run on ATen's slow fallback.

    .venv/bin/python scripts/vision_tower_speed.py                        # ~3 minutes
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python scripts/vision_tower_speed.py

The second line runs it as on a CPU with AVX2 only (README, speed section); ~5 minutes.
One 896 x 896 image, timed on its second call.
"""

import time

import torch
from transformers.models.siglip.modeling_siglip import SiglipVisionModel

from gemma_opt.models import gemma_3_4b_config

torch.manual_seed(0)
model = SiglipVisionModel(gemma_3_4b_config().vision_config).eval()
pixels = torch.randn(1, 3, 896, 896)
for dtype in (torch.bfloat16, torch.float32):
    tower, image = model.to(dtype), pixels.to(dtype)
    with torch.inference_mode():
        tower(pixel_values=image)
        start = time.perf_counter()
        tower(pixel_values=image)
        seconds = time.perf_counter() - start
    print(f"{str(dtype):>14}: one 896x896 image through the vision tower in {seconds:.2f} s "
          f"(CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"oneDNN bf16 kernels: {torch.ops.mkldnn._is_mkldnn_bf16_supported()})")
