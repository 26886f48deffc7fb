"""``python -m gemma_opt``: local predictions, the Cog HTTP server, weights, schema, the pipeline's config, eval,
bench."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .config import QUANT_MODES, SPARSITY_CHOICES, ConfigError
from .models import GENERATION_DEFAULTS, ModelNotFoundError

GEMMA_REPO = "google/gemma-3-4b-it"
GEMMA_REVISION = "093f9f388b31de276ce2de164bdc2081324b9767"
MODEL_HELP = "sets GEMMA_OPT_MODEL (preset, folder or .gguf)"


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number not below ``minimum`` (bench took 0 new tokens and
    printed a decode rate of 0, and 0 repeats ended in a traceback)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def predict(args) -> None:
    """Run predict.py's Predictor in-process, like `cog predict -i name=value -i file=@path`; a
    file input may also be a URL or data URI, downloaded as Cog's server does. Inputs are
    checked, and URLs downloaded, before the model loads: a typo costs no setup. Errors are
    one line, as the server's are, setup's missing weights and unsupported options included."""
    from cog import Path as CogPath
    from cog import _inspector
    from cog.types import URLPath
    from requests import RequestException  # what cog downloads URLs with

    from .cog_schema import predictor_info
    from .generation import InputError

    sys.path.insert(0, os.getcwd())
    info = predictor_info(args.predictor)  # imports predict.py, which reads the pipeline's GEMMA_OPT_*
    values = {}
    for item in args.input:
        key, _, value = item.partition("=")
        if value.startswith("@"):
            if not os.path.isfile(value[1:]):
                sys.exit(f"{key}: no such file: {value[1:]}")
            value = CogPath(value[1:])
        values[key] = value
    try:
        inputs = _inspector.check_input(info.inputs, values)
    except ValueError as e:
        sys.exit(f"error: {e}")
    for key, value in inputs.items():
        if isinstance(value, URLPath):
            try:
                inputs[key] = value.convert()
            except RequestException as e:
                sys.exit(f"{key}: could not download {value}: {e}")
    predictor = getattr(importlib.import_module(info.module_name), info.predictor_name)()
    predictor.setup()
    try:
        for text in predictor.run(**inputs):
            print(text, end="", flush=True)
    except InputError as e:
        sys.exit(f"\nerror: {e}")
    print()


def serve(args) -> None:
    """Exec the real Cog HTTP server (coglet) on predict.py with the chosen model."""
    # coglet's worker process runs `python` from PATH: make it this interpreter.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = dict(os.environ, COG_PREDICT_TYPE_STUB=args.predictor, PORT=str(args.port), PATH=path)
    os.execvpe(sys.executable, [sys.executable, "-m", "cog.server.http", "--host", args.host], env)


def schema(args) -> None:
    from .cog_schema import write_schema

    sys.path.insert(0, os.getcwd())
    print(f"wrote {write_schema()}")


def download(args) -> None:
    """gemma-3-4b-it at a pinned revision (gated: needs a token and an accepted licence)."""
    import json

    from huggingface_hub import get_token, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    if not get_token():  # $HF_TOKEN, or the one `hf auth login` stored
        sys.exit("no Hugging Face token: gemma-3-4b-it is gated. Accept its licence on Hugging Face, create a "
                 "read token, and run `hf auth login` or `HF_TOKEN=hf_... python -m gemma_opt download`.")
    dest = Path(args.dest)
    try:
        snapshot_download(args.repo, revision=args.revision, local_dir=dest,
                          allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"])
    except (HfHubHTTPError, OSError) as e:  # no network, no access to the gated repo, a full disk
        sys.exit(f"could not download {args.repo}@{args.revision}: {type(e).__name__}: {' '.join(str(e).split())}")
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    missing = sorted({f for f in index["weight_map"].values() if not (dest / f).is_file()})
    if missing or json.loads((dest / "config.json").read_text())["model_type"] != "gemma3":
        sys.exit(f"download incomplete or not Gemma 3: missing {missing}")
    print(f"{args.repo}@{args.revision} verified in {dest}")


def evaluate(args) -> None:
    import json

    from .evaluation import evaluate as run_eval
    from .evaluation import plot

    text = Path(args.text).read_text() if args.text else None
    records = run_eval(args.model, args.methods.split(","), args.ratios.split(","), args.quantization, text, args.window)
    print("| method | ratio | quantization | sparsity | perplexity | KL mean | top-1 agreement | pipeline s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        ratio = f"{r['ratio']:g}" if r["pattern"] == "unstructured" else r["pattern"]
        print(f"| {r['method']} | {ratio} | {r['quantization']} | {r['sparsity']:.1%} | {r['perplexity']:.2f} "
              f"| {r['kl_mean']:.4f} | {r['top1_agreement']:.1%} | {r['pipeline_s']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    if args.plot:
        plot(records, args.plot)


def benchmark(args) -> None:
    import json

    from .bench import (BASELINE, bench, cold_boot, cold_boot_table, paired, paired_table, profiles, served, served_table,
                        table)

    def save(records):
        if args.json:
            Path(args.json).write_text(json.dumps(records, indent=1))

    if args.profile and (args.cold_boot or args.served or args.paired):
        raise SystemExit("--profile profiles the variants that plain `bench` times, not --cold-boot, --served or --paired")
    if args.paired:
        records = paired(args.model, args.variants.split(","), args.prompt_tokens, args.new_tokens, args.paired)
        save(records)
        print(paired_table(records))
        return
    if args.cold_boot:
        records = cold_boot(args.model, [v for v in args.variants.split(",") if v != BASELINE])
        save(records)
        print(cold_boot_table(records))
        return
    if args.served:
        records = served(args.model, args.variants.split(","), args.prompt_tokens, args.new_tokens, args.repeats)
        save(records)
        print(served_table(records))
        return

    records = bench(args.model, args.variants.split(","), args.prompt_tokens, args.new_tokens, args.repeats, save,
                    args.profile, args.sample)
    print(table(records))
    if args.profile:
        print("\n" + profiles(records))
    measured = [r for r in records if "error" not in r]
    low, high = (f(r["bandwidth_bytes_per_s"] for r in measured) / 1e9 for f in (min, max))
    print(f"\nmeasured read bandwidth: {low:.1f}-{high:.1f} GB/s on {measured[0]['device']}, "
          f"{measured[0]['threads']} threads (each variant's best, probed right after each of its timed runs); "
          f"roofline = that variant's bandwidth / weight bytes read per decoded token; "
          f"decoding: {measured[0]['sampling']}")


def bench_one(args) -> None:
    import json

    from .bench import run_variant

    print(json.dumps(run_variant(args.model, args.variant, args.prompt_tokens, args.new_tokens, args.repeats,
                                 args.profile, args.sample)))


def profile(args) -> None:
    from .bench import check_variants, profile_decode

    check_variants([args.variant])
    print(profile_decode(args.model, args.variant, args.prompt_tokens, args.new_tokens))


def setup_one(args) -> None:
    import json

    from .bench import run_setup

    print(json.dumps(run_setup(args.model, args.variant, args.cache_dir)))


def config(args) -> None:
    """The pipeline that ``setup()`` would run, resolved and validated as setup resolves it
    (defaults, ``GEMMA_OPT_CONFIG``'s file, ``GEMMA_OPT_*``), without loading a model: a
    typo in cog.yaml is one line here instead of a failed boot."""
    import yaml

    from .cog_schema import cog_yaml_environment
    from .config import PipelineConfig, env_options

    try:
        pipeline = PipelineConfig.load(env=cog_yaml_environment(args.cog_yaml) if args.cog_yaml else None)
    except OSError as e:
        sys.exit(f"error: {e}")
    if not args.env:
        print(yaml.safe_dump(pipeline.model_dump(mode="json"), sort_keys=False), end="")
        return
    print("# every option as an environment variable (lists: comma-separated; empty: none)")
    for name, value, meaning in env_options(pipeline):
        print(f"# {meaning}\n{name}={value}" if meaning else f"{name}={value}")


def prebuild(args) -> None:
    """Build the cold-boot cache for the deployment's pipeline (GEMMA_OPT_* as in cog.yaml)."""
    from .cache import load_and_optimize
    from .config import PipelineConfig

    config = PipelineConfig.load()
    config = config.replace(cache_dir=args.cache_dir or str(config.cache_dir or "weights/cache"))
    _, report = load_and_optimize(config, must_save=True)
    print(report.summary())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gemma_opt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("predict", help="one prediction in-process (mirrors `cog predict`)")
    p.add_argument("-i", "--input", action="append", default=[], help="name=value, or name=@file")
    p.add_argument("--model", dest="gemma_opt_model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--predictor", default="predict.py:Predictor")
    p.set_defaults(func=predict)

    p = commands.add_parser("serve", help="start the Cog HTTP server (python -m cog.server.http)")
    p.add_argument("--model", dest="gemma_opt_model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--predictor", default="predict.py:Predictor")
    p.set_defaults(func=serve)

    p = commands.add_parser("schema", help="write .cog/openapi_schema.json from predict.py")
    p.set_defaults(func=schema)

    p = commands.add_parser("download", help="download gemma-3-4b-it (pinned revision) into weights/")
    p.add_argument("--repo", default=GEMMA_REPO)
    p.add_argument("--revision", default=GEMMA_REVISION)
    p.add_argument("--dest", default="weights/gemma-3-4b-it")
    p.set_defaults(func=download)

    p = commands.add_parser("eval", help="quality of pipeline variants against the dense model")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--methods", default="magnitude,wanda,owl-wanda,gradual",
                   help=f"comma list of {', '.join(SPARSITY_CHOICES)}; 'none' = quantization only")
    p.add_argument("--ratios", default="0.1,0.3,0.5,0.7,2:4", help="comma list of fractions and N:M patterns")
    p.add_argument("--quantization", default="int8_weight_only", choices=list(QUANT_MODES))
    p.add_argument("--text", help="evaluation text file (default: the one shipped, never used for calibration)")
    p.add_argument("--window", type=at_least(2), default=256, help="tokens per window, BOS first")
    p.add_argument("--json")
    p.add_argument("--plot", help="PNG file")
    p.set_defaults(func=evaluate)

    for name, func, help_ in (("bench", benchmark, "speed and memory against plain transformers bf16"),
                              ("bench-one", bench_one, "one variant in this process, as JSON (bench runs one "
                               "per variant in a fresh process)")):
        p = commands.add_parser(name, help=help_)
        p.add_argument("--model", default="gemma-3-270m")
        p.add_argument("--prompt-tokens", type=at_least(1), default=128)
        p.add_argument("--new-tokens", type=at_least(2), default=64, help="a decode rate needs two or more")
        p.add_argument("--repeats", type=at_least(1), default=3)
        p.add_argument("--profile", type=at_least(0), default=0, metavar="TOP", help="then profile each pipeline "
                       "variant's decode step in the same process and list its TOP kernels (0: no profile)")
        p.add_argument("--sample", nargs="?", type=at_least(0), const=GENERATION_DEFAULTS["top_k"], metavar="TOP_K",
                       help="sample with the service's defaults (temperature, top-p, top-k; TOP_K, if "
                       "given, replaces top-k, 0: no limit) instead of greedy decoding, the baseline's generate() too")
        if name == "bench":
            p.add_argument("--variants", default="int8-head-compile", help="comma list of named variants (bench.py's "
                           "VARIANTS; the default is the default pipeline), each against hf-eager-bf16")
            p.add_argument("--json")
            p.add_argument("--cold-boot", action="store_true", help="setup time per variant without and with "
                           "the cold-boot cache, each boot a fresh process")
            p.add_argument("--paired", type=at_least(0), default=0, metavar="ROUNDS", help="the variants in one "
                           "process, one greedy generation each per round, alternating, ROUNDS rounds: each one's "
                           "speed against the first variant's in the same round (resolves a few percent on a "
                           "drifting machine)")
            p.add_argument("--served", action="store_true", help="decode speed in a plain process and through "
                           "the real Cog server (its tokens_per_second metric), per variant")
        else:
            p.add_argument("--variant", required=True)
        p.set_defaults(func=func)

    p = commands.add_parser("profile", help="where one variant's decode step spends its time (torch.profiler)")
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--variant", default="int8-head-compile")
    p.add_argument("--prompt-tokens", type=at_least(1), default=128)
    p.add_argument("--new-tokens", type=at_least(2), default=33)
    p.set_defaults(func=profile)

    p = commands.add_parser("setup-one", help="one variant's setup() timed in this process, as JSON (what "
                            "bench --cold-boot runs per boot)")
    p.add_argument("--model", required=True)
    p.add_argument("--variant", required=True)
    p.add_argument("--cache-dir", required=True)
    p.set_defaults(func=setup_one)

    p = commands.add_parser("config", help="the pipeline setup() would run here (GEMMA_OPT_CONFIG, GEMMA_OPT_*), "
                            "validated, as YAML (a GEMMA_OPT_CONFIG file)")
    p.add_argument("--env", action="store_true", help="as one GEMMA_OPT_* variable per option, with its meaning")
    p.add_argument("--cog-yaml", nargs="?", const="cog.yaml", metavar="PATH",
                   help="the pipeline cog.yaml deploys: its environment entries instead of this shell's")
    p.set_defaults(func=config)

    p = commands.add_parser("prebuild", help="build the cold-boot cache for the deployment's pipeline (GEMMA_OPT_*), "
                            "e.g. on the target GPU before baking weights/ into the image")
    p.add_argument("--cache-dir", help="default: GEMMA_OPT_CACHE_DIR, else weights/cache")
    p.set_defaults(func=prebuild)

    args = parser.parse_args(argv)
    if getattr(args, "gemma_opt_model", None):  # before predict.py is imported (predict) or the server starts (serve)
        os.environ["GEMMA_OPT_MODEL"] = args.gemma_opt_model
    try:
        args.func(args)
    except (ModelNotFoundError, ConfigError) as e:  # weights to get, an option that cannot work: the message says which
        sys.exit(f"error: {e}")
