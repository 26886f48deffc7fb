"""Quality of a model against text and against the dense model it came from."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

DEFAULT_EVAL_TEXT = Path(__file__).parent / "data" / "evaluation.txt"


def eval_windows(tokenizer, text: str, window: int = 256) -> list[Tensor]:
    """The text as BOS-led windows of ``window`` tokens (the last, shorter one dropped)."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    body = window - 1
    bos = torch.tensor([tokenizer.bos_token_id])
    return [torch.cat([bos, ids[i:i + body]])[None] for i in range(0, len(ids) - body + 1, body)]


@torch.inference_mode()
def log_probs(model: nn.Module, windows: list[Tensor]) -> list[Tensor]:
    """Next-token log-probabilities (float32, on CPU) for every window position but the last."""
    out = []
    for ids in windows:
        logits = model(input_ids=ids.to(model.device), use_cache=False).logits[0, :-1].float()
        out.append(torch.log_softmax(logits, dim=-1).cpu())
    return out


@dataclass
class Quality:
    perplexity: float
    kl_mean: float | None = None  # mean per-token KL(dense || model)
    top1_agreement: float | None = None  # fraction of positions whose argmax matches the dense model's

    @classmethod
    def measure(cls, lps: list[Tensor], windows: list[Tensor], dense: list[Tensor] | None = None) -> Quality:
        nll = torch.cat([-lp.gather(1, w[0, 1:, None].cpu())[:, 0] for lp, w in zip(lps, windows)])
        quality = cls(math.exp(nll.mean().item()))
        if dense is not None:
            kl = torch.cat([(d.exp() * (d - lp)).sum(-1) for d, lp in zip(dense, lps)])
            agree = torch.cat([d.argmax(-1) == lp.argmax(-1) for d, lp in zip(dense, lps)])
            quality.kl_mean, quality.top1_agreement = kl.mean().item(), agree.float().mean().item()
        return quality


def perplexity(model: nn.Module, tokenizer, text: str | None = None, window: int = 256) -> float:
    windows = eval_windows(tokenizer, text or DEFAULT_EVAL_TEXT.read_text(), window)
    return Quality.measure(log_probs(model, windows), windows).perplexity


def evaluate(model: str, methods: list[str], ratios: list[str], quantization: str = "int8_weight_only",
             text: str | None = None, window: int = 256) -> list[dict]:
    """One record per pipeline variant, against the dense bf16 model on the same windows.

    ``methods`` are SPARSITY_CHOICES (``wanda``, ``owl-wanda``...); ``ratios`` are fractions
    or N:M patterns (``"0.5"``, ``"2:4"``). Combinations the config refuses are skipped,
    with the reason printed; an unknown method, a ratio that is neither, or nothing left to
    measure is a ConfigError, before the model loads.
    """
    from tqdm import tqdm

    from .config import NEURON_METHODS, SPARSITY_CHOICES, ConfigError, PipelineConfig
    from .models import load_model
    from .pipeline import optimize
    from .quantization import check_quantization

    unknown = [method for method in methods if method not in SPARSITY_CHOICES]
    if unknown:
        raise ConfigError(f"unknown methods {unknown}; choose from {list(SPARSITY_CHOICES)}")
    variants = []
    for method in methods:
        for ratio in [None] if method == "none" else ratios:
            try:
                sparsity = {} if ratio is None else {"pattern": ratio} if ":" in ratio else {"ratio": float(ratio)}
            except ValueError:
                raise ConfigError(f"ratio {ratio!r} is neither a fraction (0.5) nor an N:M pattern (2:4)") from None
            prune = {**SPARSITY_CHOICES[method], **sparsity}
            prune["compact"] = prune["method"] in NEURON_METHODS  # the model measured is the narrower one
            try:
                variants.append((method, PipelineConfig.validated({
                    "model": model, "prune": prune, "quant": {"mode": quantization}, "compile": {"mode": "none"}})))
            except ConfigError as e:
                print(f"skipped {method} {ratio}: {e}")
    if not variants:
        raise ConfigError("nothing to evaluate: the config refuses every variant asked for (above)")
    check_quantization(variants[0][1].quant, "cpu", torch.bfloat16)  # where load_model puts them
    dense = load_model(model)
    windows = eval_windows(dense.tokenizer, text or DEFAULT_EVAL_TEXT.read_text(), window)
    reference = log_probs(dense.model, windows)
    records = [{"method": "dense", "ratio": 0.0, "pattern": "unstructured", "quantization": "none", "sparsity": 0.0,
                "pipeline_s": 0.0, **vars(Quality.measure(reference, windows, reference))}]
    del dense
    for method, config in tqdm(variants, desc="eval", unit="variant"):
        loaded = load_model(model)
        report = optimize(loaded, config)
        quality = Quality.measure(log_probs(loaded.model, windows), windows, reference)
        records.append({"method": method, "ratio": config.prune.target_ratio, "pattern": config.prune.pattern,
                        "quantization": quantization, "sparsity": report.prune.overall,
                        "pipeline_s": sum(report.stage_seconds.values()), **vars(quality)})
    for record in records:
        record.update(window=window, tokens=sum(w.shape[1] - 1 for w in windows))
    return records


def plot(records: list[dict], path: str) -> None:
    """Perplexity and top-1 agreement against achieved sparsity, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next(r for r in records if r["method"] == "dense")
    fig, (ax_ppl, ax_agree) = plt.subplots(1, 2, figsize=(11, 4.2))
    lines = dict.fromkeys((r["method"], r["pattern"]) for r in records if r["method"] not in ("dense", "none"))
    for method, pattern in lines:
        rows = sorted((r for r in records if (r["method"], r["pattern"]) == (method, pattern)),
                      key=lambda r: r["sparsity"])
        label = method if pattern == "unstructured" else f"{method} {pattern}"
        x = [100 * r["sparsity"] for r in rows]
        ax_ppl.plot(x, [r["perplexity"] for r in rows], marker="o" if pattern == "unstructured" else "s", label=label)
        ax_agree.plot(x, [100 * r["top1_agreement"] for r in rows], marker="o" if pattern == "unstructured" else "s",
                      label=label)
    for ax, value in ((ax_ppl, dense["perplexity"]), (ax_agree, 100.0)):
        ax.axhline(value, color="black", linestyle="--", linewidth=1, label="dense bf16")
        ax.set_xlabel("achieved sparsity of the decoder linears (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    ax_ppl.set_yscale("log")
    ax_ppl.set_ylabel("perplexity (log scale; lower is better)")
    ax_agree.set_ylabel("top-1 agreement with dense (%)")
    quant = next((r["quantization"] for r in records if r["method"] != "dense"), "none")
    fig.suptitle(f"Quality vs sparsity (each followed by {quant}); {dense['tokens']} held-out tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
