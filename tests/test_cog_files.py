import fnmatch
import json
import os
import subprocess
import sys
from importlib import metadata

import jsonschema
import pytest
import yaml
from PIL import Image

from conftest import ROOT, png_bytes
SHARED_SCHEMA = ROOT.parent / "shared" / "cog" / "config_schema_v1.0.json"


@pytest.mark.skipif(not SHARED_SCHEMA.exists(), reason="Cog's schema lives in ../shared")
def test_cog_yaml_validates_against_cogs_own_schema():
    jsonschema.validate(yaml.safe_load((ROOT / "cog.yaml").read_text()), json.loads(SHARED_SCHEMA.read_text()))


def test_cog_yaml_uses_the_pins_installed_here():
    cog = yaml.safe_load((ROOT / "cog.yaml").read_text())
    assert cog["build"]["gpu"] is True and cog["build"]["python_requirements"] == "requirements.txt"
    assert cog["build"]["python_version"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            assert metadata.version(name).split("+")[0] == version, name


def test_the_image_gets_the_weights_and_the_cold_boot_cache_but_not_the_local_venv():
    """setup() loads weights/gemma-3-4b-it and weights/cache from the image; .dockerignore keeps
    what `make` builds here (and git history) out of it."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and p[0] != "#"]

    def ignored(path: str) -> bool:
        """Docker's rules, loosely: a pattern excludes a path, a folder above it, or (``**/``) a folder anywhere."""
        parts = path.split("/")
        above = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        return any(fnmatch.fnmatch(folder, p) or (p.startswith("**/") and fnmatch.fnmatch(folder.rsplit("/")[-1], p[3:]))
                   for p in patterns for folder in above)

    assert not any(ignored(p) for p in ("weights/gemma-3-4b-it/config.json", "weights/cache/key/model.pt", "predict.py",
                                        "gemma_opt/int8_gemv.cpp"))
    assert all(ignored(p) for p in (".venv/bin/python", ".git/HEAD", ".gpu/tokenizer.tar.gz", "gemma_opt/__pycache__/x.pyc"))


def test_openapi_schema_is_in_sync_with_predict_py():
    script = "import json, sys; from gemma_opt.cog_schema import *; " \
             "os.environ.update(cog_yaml_environment()); sys.path.insert(0, '.'); print(json.dumps(openapi_schema()))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEMMA_OPT_")}
    fresh = subprocess.run([sys.executable, "-c", "import os; " + script], cwd=ROOT, env=env, check=True,
                           capture_output=True, text=True).stdout
    committed = json.loads((ROOT / ".cog" / "openapi_schema.json").read_text())
    assert json.loads(fresh.strip().splitlines()[-1]) == committed, "run `python -m gemma_opt schema`"
    assert committed["paths"]["/predictions"]["post"]["x-cog-streaming"] is True


def local_predict(*inputs: str, model: str | None = None, **variables: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "GEMMA_OPT_MODEL": "tiny-random", "GEMMA_OPT_COMPILE_MODE": "none", **variables}
    args = [arg for item in ("prompt=What colour?", "max_new_tokens=5", *inputs) for arg in ("-i", item)]
    args += ["--model", model] if model else []
    return subprocess.run([sys.executable, "-m", "gemma_opt", "predict", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_local_predict_mirrors_cog_predict(tmp_path):
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (80, 60), (10, 20, 200)).save(photo)
    run = local_predict(f"image=@{photo}", "seed=3")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "seed: 3" in run.stdout and run.stdout.strip().splitlines()[-1].strip()


def test_local_predict_downloads_an_image_url_and_refuses_bad_inputs_before_loading(tmp_path, http_files):
    """As Cog's server takes a URL for a file input; a typo fails in one line, before the model loads."""
    base, served = http_files
    served.files["/photo.png"] = png_bytes()
    run = local_predict(f"image={base}/photo.png")
    assert run.returncode == 0, run.stderr[-2000:]

    for item, message in [(f"image=@{tmp_path}/typo.jpg", f"image: no such file: {tmp_path}/typo.jpg"),
                          (f"image={base}/typo.png", f"image: could not download {base}/typo.png: 404"),
                          ("temperature=5", "error: temperature fails constraint <= 2")]:
        run = local_predict(item)
        assert run.returncode == 1 and run.stderr.strip().splitlines()[-1].startswith(message), run.stderr[-2000:]
        assert "Traceback" not in run.stderr and "filter map" not in run.stdout  # the model never loaded
    run = local_predict(GEMMA_OPT_PRUNE_RATO="0.3")  # a typo in the pipeline's variables, as cog.yaml sets them
    assert run.returncode == 1 and run.stderr.strip().splitlines()[-1].startswith(
        "error: unknown variable GEMMA_OPT_PRUNE_RATO (did you mean GEMMA_OPT_PRUNE_RATIO?)"), run.stderr[-2000:]


def test_a_request_that_cannot_be_answered_fails_before_the_variant_it_asks_for_is_built(tmp_path):
    """A variant's build (pruning, quantization, compile) takes minutes on the 4B: a bad file, an
    empty prompt or one longer than the context fails first."""
    (tmp_path / "corrupt.jpg").write_bytes(b"not a jpeg")
    for item, message in [(f"image=@{tmp_path}/corrupt.jpg", "error: image: not a readable image file"),
                          ("prompt= ", "error: the prompt is empty"),
                          ("prompt=" + "word " * 5000, "error: prompt (5009 tokens) plus max_new_tokens (5) exceeds")]:
        run = local_predict(item, "sparsity_method=magnitude", "sparsity_ratio=0.3")
        assert run.returncode == 1 and run.stderr.strip().splitlines()[-1].startswith(message), run.stderr[-2000:]
        assert "variant built" not in run.stderr
    run = local_predict("sparsity_method=magnitude", "sparsity_ratio=0.3")
    assert run.returncode == 0 and "variant built for a request: tiny-random: " in run.stderr, run.stderr[-2000:]


def test_local_predict_takes_a_model_and_reports_a_failed_setup_in_one_line(tmp_path):
    """``--model`` as ``serve`` takes it; weights not there, or a pipeline this machine cannot
    run, fail setup in one line, as a bad input does."""
    missing = tmp_path / "gemma-3-4b-it"
    run = local_predict(model="tiny-random", GEMMA_OPT_MODEL=str(missing))
    assert run.returncode == 0, run.stderr[-2000:]
    for run, message in [(local_predict(model=str(missing)), f"error: no model at '{missing}'. Download gemma-3-4b-it"),
                         (local_predict(GEMMA_OPT_DEVICE="cpu", GEMMA_OPT_QUANT_MODE="int4_weight_only"),
                          "error: int4_weight_only is not supported by torchao")]:
        assert run.returncode == 1 and run.stderr.strip().splitlines()[-1].startswith(message), run.stderr[-2000:]
        assert "Traceback" not in run.stderr
