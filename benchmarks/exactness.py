#!/usr/bin/env python3
"""How far float rounding moves outputs when the shape of the work changes.

    python benchmarks/exactness.py [--model tiny]

1. One expert FFN with switch-base shapes (768 -> 3072 -> 768, HF's init scale): its
   outputs for n tokens computed in one matmul vs split in two chunks (what the
   `split` replica policy does). Printed: the largest absolute and relative difference.
2. The single-process HF model itself: a prompt's logits run alone vs padded beside a
   longer prompt in one batch (what batching concurrent requests does).
Both explain the README's exactness notes: `whole` dispatch and fp32 on the wire
reproduce HF bit for bit on the same batch; these two changes of shape do not.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_common import model_source  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="model for part 2")
    a = p.parse_args()
    torch.manual_seed(0)
    d_model, d_ff = 768, 3072
    wi = torch.randn(d_ff, d_model) * d_model ** -0.5
    wo = torch.randn(d_model, d_ff) * d_model ** -0.5

    def ffn(x):
        return F.linear(F.relu(F.linear(x, wi)), wo)

    print("1. expert FFN, one matmul vs two chunks (fp32, this CPU):")
    for n in (2, 17, 64, 257, 1024):
        x = torch.randn(n, d_model)
        whole = ffn(x)
        cut = n // 2
        split = torch.cat([ffn(x[:cut]), ffn(x[cut:])])
        diff = (whole - split).abs()
        print(f"   n={n:<5} identical {torch.equal(whole, split)!s:<5}  max abs {diff.max().item():.2e}  "
              f"max rel {(diff / whole.abs().clamp_min(1e-6)).max().item():.2e}  (output scale {whole.abs().mean().item():.2f})")

    from transformers import AutoTokenizer, SwitchTransformersForConditionalGeneration

    source = model_source.resolve(a.model)
    model = SwitchTransformersForConditionalGeneration.from_pretrained(source.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    short, long = "Mixture of experts.", "A much longer prompt that makes the short one padded in the same batch. " * 2
    with torch.no_grad():
        alone_in = tokenizer([short], return_tensors="pt")
        batch_in = tokenizer([short, long], return_tensors="pt", padding=True)
        dec = torch.zeros((1, 4), dtype=torch.long)
        alone = model(**alone_in, decoder_input_ids=dec).logits[0]
        batched = model(**batch_in, decoder_input_ids=dec.expand(2, -1)).logits[0]
    diff = (alone - batched).abs().max().item()
    print(f"2. HF {a.model}: a prompt's logits alone vs padded in a batch: identical {torch.equal(alone, batched)}, "
          f"max abs difference {diff:.2e} (logit scale {alone.abs().mean().item():.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
