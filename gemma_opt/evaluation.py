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
    device = next(model.parameters()).device
    out = []
    for ids in windows:
        logits = model(input_ids=ids.to(device), use_cache=False).logits[0, :-1].float()
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
