"""Offline trace collection: run the single-process model over a text and record routing.

Documents are the non-empty lines of the text; a document longer than max_length
tokens is cut into max_length-token chunks (each ending with EOS), so plain text works
too. Batches keep the text's order, as a stream of requests would. Every batch runs
one encoder pass and `new_tokens` greedy decoder steps, all recorded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moe_common import model_source
from moe_common.batching import pad_right
from moe_common.traces import RoutingRecorder, TraceInfo, TraceWriter


def chunk_documents(tokenizer, documents: list[str], max_length: int) -> list[list[int]]:
    """Token ids of every document, cut into pieces of at most max_length (EOS included)."""
    eos = tokenizer.eos_token_id
    chunks: list[list[int]] = []
    for doc in documents:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids), max_length - 1):
            chunks.append(ids[i: i + max_length - 1] + [eos])
    return chunks


def collect(model: str, documents: list[str], out: Path, *, batch_size: int = 8, max_length: int = 128,
            new_tokens: int = 8, cache_dir: Path = model_source.DEFAULT_CACHE_DIR, progress: bool = True) -> int:
    """Record traces of `documents` into `out`; returns the number of passes written."""
    from tqdm import tqdm
    from transformers import AutoTokenizer, SwitchTransformersForConditionalGeneration

    source = model_source.resolve(model, cache_dir)
    hf = SwitchTransformersForConditionalGeneration.from_pretrained(source.path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    info = TraceInfo.from_config(hf.config, source)
    writer = TraceWriter(out, info)
    recorder = RoutingRecorder(hf, info, on_pass=writer.add)
    chunks = chunk_documents(tokenizer, documents, max_length)
    pad = hf.config.pad_token_id
    try:
        for start in tqdm(range(0, len(chunks), batch_size), desc="collecting", unit="batch", disable=not progress):
            input_ids, mask = pad_right(chunks[start: start + batch_size], pad)
            with torch.inference_mode():
                hf.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                            min_new_tokens=new_tokens)
    finally:
        recorder.remove()
        writer.close()
    return writer.passes_written
