"""``python -m gemma_opt``: local predictions, the Cog HTTP server, weights, schema, eval, bench."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

GEMMA_REPO = "google/gemma-3-4b-it"
GEMMA_REVISION = "093f9f388b31de276ce2de164bdc2081324b9767"


def predict(args) -> None:
    """Run predict.py's Predictor in-process, like `cog predict -i name=value -i file=@path`."""
    from cog import Path as CogPath
    from cog import _inspector

    sys.path.insert(0, os.getcwd())
    module, name = args.predictor.split(":")
    info = _inspector.create_predictor(module.removesuffix(".py"), name)
    values = {}
    for item in args.input:
        key, _, value = item.partition("=")
        values[key] = CogPath(value[1:]) if value.startswith("@") else value
    inputs = _inspector.check_input(info.inputs, values)
    predictor = getattr(importlib.import_module(module.removesuffix(".py")), name)()
    predictor.setup()
    for text in predictor.run(**inputs):
        print(text, end="", flush=True)
    print()


def serve(args) -> None:
    """Exec the real Cog HTTP server (coglet) on predict.py with the chosen model."""
    # coglet's worker process runs `python` from PATH: make it this interpreter.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = dict(os.environ, COG_PREDICT_TYPE_STUB=args.predictor, PORT=str(args.port), PATH=path)
    if args.model:
        env["GEMMA_OPT_MODEL"] = args.model
    os.execvpe(sys.executable, [sys.executable, "-m", "cog.server.http", "--host", args.host], env)


def schema(args) -> None:
    from .cog_schema import write_schema

    sys.path.insert(0, os.getcwd())
    print(f"wrote {write_schema()}")


def download(args) -> None:
    """gemma-3-4b-it at a pinned revision (gated: needs HF_TOKEN and an accepted licence)."""
    import json

    from huggingface_hub import snapshot_download

    if not os.environ.get("HF_TOKEN"):
        sys.exit("HF_TOKEN is not set: gemma-3-4b-it is gated. Accept its licence on Hugging Face, "
                 "create a read token, and run `HF_TOKEN=hf_... python -m gemma_opt download`.")
    dest = Path(args.dest)
    snapshot_download(args.repo, revision=args.revision, local_dir=dest,
                      allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"])
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    missing = sorted({f for f in index["weight_map"].values() if not (dest / f).is_file()})
    if missing or json.loads((dest / "config.json").read_text())["model_type"] != "gemma3":
        sys.exit(f"download incomplete or not Gemma 3: missing {missing}")
    print(f"{args.repo}@{args.revision} verified in {dest}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gemma_opt", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("predict", help="one prediction in-process (mirrors `cog predict`)")
    p.add_argument("-i", "--input", action="append", default=[], help="name=value, or name=@file")
    p.add_argument("--predictor", default="predict.py:Predictor")
    p.set_defaults(func=predict)

    p = commands.add_parser("serve", help="start the Cog HTTP server (python -m cog.server.http)")
    p.add_argument("--model", help="sets GEMMA_OPT_MODEL (preset, folder or .gguf)")
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

    args = parser.parse_args(argv)
    args.func(args)
