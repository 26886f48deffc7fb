"""Our Triton kernels compiled here, without a GPU, for the GPUs the service runs on: Triton
brings NVIDIA's assembler and `cuobjdump`. What a GPU session would otherwise find in its few
minutes is found here: a kernel that does not compile for Hopper (sm_90, the lent H200s) or
Ada (sm_89, the L40S this service targets) with the argument types inductor gives it (a
Python float as fp64: session 20's first H200 bench failed on that in the attention kernel),
an INT8 GEMV tiling that reads its weights a byte at a time, spills registers, or is not
pipelined where it should be, or a kernel that goes back to memory after its arithmetic has
begun (a second round trip in a kernel of a few microseconds). Speed is scripts/gpu_check.sh's."""

import re
import subprocess
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="Triton comes with CUDA builds of torch; `make test` installs it")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from gemma_opt import decode_attention_cuda, int8_gemv_cuda  # noqa: E402

TARGETS = {"sm90": GPUTarget("cuda", 90, 32), "sm89": GPUTarget("cuda", 89, 32)}
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
# How a launch marks a 16-byte-aligned pointer or an int divisible by 16 (every Gemma 3 shape)
DIVISIBLE_BY_16 = [["tt.divisibility", 16]]


def machine_code(tmp_path, target, fn, types, constexprs, num_warps, divisible=()) -> tuple[str, int]:
    """``fn`` compiled for ``target``, its arguments typed by ``types`` (the others i32):
    its SASS, and the bytes of local memory a thread uses (register spills)."""
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): DIVISIBLE_BY_16 for name in divisible}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=TARGETS[target], options={"num_warps": num_warps})
    cubin = tmp_path / f"{fn.__name__}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    sass, usage = (subprocess.run([CUOBJDUMP, option, cubin], capture_output=True, text=True, check=True).stdout
                   for option in ("--dump-sass", "--dump-resource-usage"))
    return sass, int(re.search(r"LOCAL:(\d+)", usage).group(1))


def opcodes(sass: str) -> list[str]:
    """The instructions' names in order, without their modifiers (``LDG`` for ``LDG.E.128``)."""
    return re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z]+)", sass, re.M)


@pytest.mark.parametrize("target", TARGETS)
def test_every_int8_gemv_tiling_compiles_to_wide_weight_loads_without_spills_or_a_last_load(tmp_path, target):
    fn = int8_gemv_cuda.int8_gemv_kernel
    types = {"x_ptr": "*bf16", "w_ptr": "*i8", "scale_ptr": "*bf16", "y_ptr": "*bf16"}
    for config in int8_gemv_cuda.CONFIGS:
        name = int8_gemv_cuda.config_name(config)
        sass, spilled = machine_code(tmp_path, target, fn, types, config.kwargs, config.num_warps,
                                     divisible=("x_ptr", "w_ptr", "scale_ptr", "y_ptr", "N", "K"))
        assert not re.search(r"LDG\.E\.[US]8", sass), f"{name}: int8 weights loaded a byte at a time"
        assert spilled == 0, f"{name}: {spilled} bytes of registers spilled a thread"
        # pipelined: the weights copied into shared memory ahead of their step (cp.async)
        assert ("LDGSTS" in sass) == (config.kwargs["STAGES"] > 1), name
        # nothing loaded after the loop (its last branch back before the sum's warp shuffles):
        # no last trip to memory once the weights are read
        ops = opcodes(sass)
        loop_end = max(i for i, op in enumerate(ops[:ops.index("SHFL")]) if op == "BRA")
        assert "LDG" not in ops[loop_end:], f"{name}: a global load after the loop"


@pytest.mark.parametrize("target", TARGETS)
def test_the_attention_kernels_compile_with_the_fp64_floats_inductor_passes_and_load_in_one_trip(tmp_path, target):
    pointers = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "mask_ptr": "*bf16", "m_ptr": "*fp32",
                "l_ptr": "*fp32", "acc_ptr": "*fp32", "out_ptr": "*bf16"}
    floats = {"scale": "fp64", "blocked": "fp64"}
    # the 4B: 8 query heads, 4 KV heads of 256 dims, 2048 positions
    chunk = {"GROUP": 2, "HAS_MASK": True, "CHUNK": decode_attention_cuda.CHUNK, "BLOCK_H": 16, "BLOCK_D": 256}
    combine = {"BLOCK_C": 2048 // decode_attention_cuda.CHUNK, "BLOCK_D": decode_attention_cuda.COMBINE_D}
    # A load issued after the scores' tensor-core products (chunks) or after a barrier of the
    # reductions (combine) waits for them: a second trip to memory in a kernel of a few microseconds
    for fn, constexprs, first in ((decode_attention_cuda.chunk_kernel, chunk, "HMMA"),
                                  (decode_attention_cuda.combine_kernel, combine, "BAR")):
        sass, spilled = machine_code(tmp_path, target, fn, pointers | floats, constexprs, num_warps=4)
        assert spilled == 0, f"{fn.__name__}: {spilled} bytes of registers spilled a thread"
        ops = opcodes(sass)
        assert "LDG" not in ops[ops.index(first):], f"{fn.__name__}: a global load after the first {first}"
