"""Request ids in the gateway (moe_common/tracing.py has the glossary).

A batch gets a batch id when it starts; the gateway logs each of its requests with
it, and every expert and predictor call the batch makes (on the batcher thread)
carries the batch's request ids and batch id in its metadata.
"""

from __future__ import annotations

import itertools
import logging

from gateway.metrics import METRICS
from moe_common import tracing

log = logging.getLogger(__name__)
_batch_ids = itertools.count(1)


def batch_started(jobs, rows: int) -> str:
    """Hook of the batcher: a batch of `jobs` (gateway.batcher.Job, `rows` prompts in all)
    starts on this thread. Returns its batch id. The ids stay this thread's context
    until its next batch, so the batch's calls and log lines carry them."""
    batch_id = str(next(_batch_ids))
    ids = [job.request_id for job in jobs if job.request_id]
    tracing.set_current(",".join(ids), batch_id)
    METRICS.batch_size.observe(rows)
    if log.isEnabledFor(logging.INFO):
        for job in jobs:
            log.info("request %s: batch %s, %d of its %d prompts", job.request_id or "-", batch_id,
                     len(job.prompts), rows)
    return batch_id
