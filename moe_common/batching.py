"""Turning token-id rows into a padded batch, as the HF tokenizer pads: on the right."""

from __future__ import annotations

import torch


def pad_right(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rows of token ids -> (input_ids [B, S], attention_mask [B, S]), S = the longest row."""
    longest = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return input_ids, mask


def generated_rows(output: torch.Tensor, eos_token_id: int) -> list[list[int]]:
    """HF generate() output [B, 1 + T] -> each row's generated ids as the gateway reports
    them: without the decoder start token, ending at EOS (HF pads rows that finished early)."""
    rows = []
    for row in output.tolist():
        ids = row[1:]
        rows.append(ids[: ids.index(eos_token_id) + 1] if eos_token_id in ids else ids)
    return rows
