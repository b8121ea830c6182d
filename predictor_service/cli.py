"""moe-predictor: collect routing traces, train and evaluate the SRU forecaster, serve forecasts.

    moe-predictor corpus --out text.txt                   # write the default text (Python docstrings)
    moe-predictor collect --model tiny --corpus text.txt --out traces/ [--batch-size 8 --max-length 128]
    moe-predictor train --traces traces/ --out forecaster.pt
    moe-predictor eval --traces heldout/ --checkpoint forecaster.pt --json
    moe-predictor serve --checkpoint forecaster.pt --port 50071      # or --model M without a checkpoint
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from moe_common import model_source, serving, tls
from moe_common.cli_help import HelpFormatter
from moe_common.corpus import add_corpus_arguments

log = logging.getLogger("moe-predictor")


def _documents(a) -> list[str]:
    from moe_common.corpus import read_documents

    docs = read_documents(a.corpus, a.corpus_format, a.corpus_doc_chars)
    return docs[a.skip_docs: a.skip_docs + a.max_docs if a.max_docs is not None else None]


def cmd_corpus(a) -> int:
    from moe_common.corpus import stdlib_text

    Path(a.out).write_text(stdlib_text() + "\n", encoding="utf-8")
    print(f"wrote {a.out}")
    return 0


def cmd_collect(a) -> int:
    from predictor_service.collect import collect

    docs = _documents(a)
    if not docs:
        print(f"{a.corpus} holds no text (after --skip-docs/--max-docs)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    n = collect(a.model, docs, a.out, batch_size=a.batch_size, max_length=a.max_length, new_tokens=a.new_tokens,
                cache_dir=a.cache_dir, progress=not a.quiet)
    print(f"recorded {n} passes from {len(docs)} documents into {a.out} in {time.monotonic() - t0:.0f} s")
    return 0


def cmd_train(a) -> int:
    from moe_common.traces import load_manifest, read_passes
    from predictor_service import forecaster

    info = load_manifest(a.traces)
    passes = list(read_passes(a.traces))
    if not passes:
        print(f"{a.traces} holds no passes: collect some first (moe-predictor collect)", file=sys.stderr)
        return 2
    init = None
    if a.model:
        source = model_source.resolve(a.model, a.cache_dir)
        if source.model_id != info.model_id:
            print(f"--model {a.model} is model {source.model_id}; the traces are of {info.model_id}", file=sys.stderr)
            return 2
        from moe_common.checkpoint import Checkpoint

        init = Checkpoint(source.path).read(["shared.weight"])["shared.weight"]
    model, report = forecaster.train(info, passes, info.vocab_size, seed=a.seed, epochs=a.epochs, patience=a.patience,
                                     lr=a.lr, val_fraction=a.val_fraction, embed_dim=a.embed_dim, hidden=a.hidden,
                                     sru_layers=a.sru_layers, bidirectional=a.bidirectional, group=a.group, init_embeddings=init, progress=not a.quiet,
                                     sru_impl=a.sru_impl)
    forecaster.save(a.out, model, info, report)
    print(f"saved {a.out}: best validation loss {report['best_val_loss']:.4f} after {len(report['epochs'])} epochs, "
          f"{report['train_seconds']:.0f} s of training")
    return 0


EVAL_METRICS = """metrics, per layer and pass, averaged (lower l1 and higher hot recall are better):
  l1       L1 distance between forecast and actual loads, each normalised to sum 1
           (0 = perfect, 2 = disjoint)
  hot      hot recall: share of the truly hottest experts (top max(1, E/8) by load) that
           the forecast also ranks in its top max(1, E/8)
  enc/dec  over encoder passes (what predictive replication plans from) / decoder steps;
           all = every pass, dominated by the many decoder steps"""


def cmd_eval(a) -> int:
    from moe_common.traces import load_manifest, read_passes
    from predictor_service import forecaster
    from predictor_service.evaluate import evaluate

    info = load_manifest(a.traces)
    model = None
    if a.checkpoint:
        try:
            model, _, _ = forecaster.load(a.checkpoint, expect_model_id=info.model_id, sru_impl=a.sru_impl)
        except ValueError as exc:
            print(str(exc), file=sys.stderr)
            return 2
    passes = list(read_passes(a.traces))
    if not passes:
        print(f"{a.traces} holds no passes to evaluate on", file=sys.stderr)
        return 2
    report = evaluate(info, passes, model, window=a.window, alpha=a.alpha)
    if a.json:
        print(json.dumps(report, indent=1))
    else:
        # Encoder figures first: predictive replication plans each batch from the forecast of
        # its encoder pass; decoder steps are many, small, and not what the SRU plans.
        print(f"passes: {report['encoder_passes']} encoder, {report['decoder_passes']} decoder steps")
        print(f"{'method':<8}{'enc l1':>9}{'enc hot':>9}{'dec l1':>9}{'dec hot':>9}{'all l1':>9}{'p50 ms':>9}{'p99 ms':>9}")

        def cell(x, width):
            return f"{x:>{width}.3f}" if x is not None else f"{'-':>{width}}"

        for name, m in report["methods"].items():
            print(f"{name:<8}{cell(m['encoder']['load_l1'], 9)}{cell(m['encoder']['hot_recall'], 9)}"
                  f"{cell(m['decoder']['load_l1'], 9)}{cell(m['decoder']['hot_recall'], 9)}{cell(m['load_l1'], 9)}"
                  f"{cell(m['forecast_ms_p50'], 9)}{cell(m['forecast_ms_p99'], 9)}")
    return 0


def cmd_serve(a) -> int:
    from moe_common.traces import TraceInfo
    from moe_protos.moe.predictor.v1 import predictor_pb2, predictor_pb2_grpc
    from predictor_service import forecaster
    from predictor_service.predictor import Predictor
    from predictor_service.servicer import PredictorServicer

    model = None
    if a.checkpoint:
        model, info, _ = forecaster.load(a.checkpoint, sru_impl=a.sru_impl)
        if a.model:
            source = model_source.resolve(a.model, a.cache_dir)
            if source.model_id != info.model_id:
                print(f"checkpoint is for model {info.model_id}; --model {a.model} is {source.model_id}", file=sys.stderr)
                return 2
    elif a.model:
        from transformers import SwitchTransformersConfig

        source = model_source.resolve(a.model, a.cache_dir)
        info = TraceInfo.from_config(SwitchTransformersConfig.from_pretrained(source.path), source)
    else:
        print("give --checkpoint (a trained forecaster) or --model (history methods only)", file=sys.stderr)
        return 2
    method = a.method or ("sru" if model is not None else "window")
    try:
        predictor = Predictor(info, method, model, a.window, a.alpha, vocab_size=info.vocab_size)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    name = predictor_pb2.DESCRIPTOR.services_by_name["PredictorService"].full_name
    try:
        tls_config = tls.from_args(a)
        tls_config.check_bind(a.host, "the predictor")
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    from moe_common import metrics, tracing
    from predictor_service.metrics import METRICS

    try:
        metrics.check_port(a.metrics_port)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    server, port, health = serving.create_server(
        f"{a.host}:{a.port}",
        [lambda s: predictor_pb2_grpc.add_PredictorServiceServicer_to_server(PredictorServicer(predictor), s)],
        [name], tls=tls_config, interceptors=[METRICS.interceptor, tracing.IncomingInterceptor()])
    metrics_server = metrics.serve(METRICS.registry, a.host, a.metrics_port)
    serving.set_serving(health, [name])
    log.info("predictor on %s:%d for model %s: %s", a.host, port, info.model_id, predictor.note)
    serving.wait_for_termination()
    if metrics_server is not None:
        metrics_server.stop()
    server.stop(grace=1).wait()
    return 0


def add_sru_impl_argument(c: argparse.ArgumentParser) -> None:
    from predictor_service.sru_kernel import SRU_IMPLS

    c.add_argument("--sru-impl", choices=SRU_IMPLS, default="auto",
                   help="the SRU's implementation: kernel (sru's C++ kernel, compiled once; needs a C++ compiler), "
                        "torch (plain PyTorch: no compiler, same weights and forecasts; forecasts up to ~2x slower "
                        "on long sequences, trains faster), or auto (the kernel when it builds, else torch, with a "
                        "warning)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-predictor", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="text lines, or one JSON object per line (with request_id and batch_id fields)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")

    c = sub.add_parser("corpus", formatter_class=HelpFormatter, help="write the default text (the Python standard library's docstrings)")
    c.add_argument("--out", required=True, help="text file to write")
    c.set_defaults(fn=cmd_corpus)

    c = sub.add_parser("collect", formatter_class=HelpFormatter, help="record routing traces by running the model over a text file")
    c.add_argument("--model", required=True, help="checkpoint directory, hub id, or preset (tiny, base-e<E>[-l<L>])")
    c.add_argument("--corpus", required=True, type=Path,
                   help="text file: paragraphs are documents (see --corpus-format); long ones are chunked")
    add_corpus_arguments(c)
    c.add_argument("--out", required=True, type=Path, help="directory the traces are written into")
    c.add_argument("--batch-size", type=int, default=8, help="documents per recorded pass")
    c.add_argument("--max-length", type=int, default=128, help="tokens per chunk")
    c.add_argument("--new-tokens", type=int, default=8, help="greedy decoder steps per batch")
    c.add_argument("--skip-docs", type=int, default=0, help="skip the first N documents (for held-out splits)")
    c.add_argument("--max-docs", type=int, default=None, help="use at most N documents (default: all)")
    c.add_argument("--cache-dir", type=Path, default=model_source.DEFAULT_CACHE_DIR,
                   help="where presets are built and hub checkpoints are kept")
    c.add_argument("--quiet", action="store_true", help="no progress lines")
    c.set_defaults(fn=cmd_collect)

    c = sub.add_parser("train", formatter_class=HelpFormatter, help="train the SRU forecaster on traces")
    c.add_argument("--traces", required=True, type=Path, help="directory of traces (moe-predictor collect)")
    c.add_argument("--out", required=True, type=Path, help="file the trained forecaster is saved to")
    c.add_argument("--model", default=None, help="initialise the token embedding from this model's input embeddings")
    c.add_argument("--cache-dir", type=Path, default=model_source.DEFAULT_CACHE_DIR,
                   help="where presets are built and hub checkpoints are kept")
    c.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the validation split")
    c.add_argument("--epochs", type=int, default=12, help="most passes over the training traces")
    c.add_argument("--patience", type=int, default=2, help="epochs without validation improvement before stopping")
    c.add_argument("--group", type=int, default=4, help="recorded batches stacked per training step")
    c.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    c.add_argument("--val-fraction", type=float, default=0.1, help="share of the passes held out for validation")
    c.add_argument("--embed-dim", type=int, default=32, help="token embedding width")
    c.add_argument("--hidden", type=int, default=32, help="SRU width per direction")
    c.add_argument("--sru-layers", type=int, default=1, help="stacked SRU layers")
    c.add_argument("--bidirectional", action="store_true", help="bidirectional encoder SRU (better, slower)")
    add_sru_impl_argument(c)
    c.add_argument("--quiet", action="store_true", help="no progress lines")
    c.set_defaults(fn=cmd_train)

    c = sub.add_parser("eval", formatter_class=HelpFormatter, help="compare the SRU with history baselines on traces",
                       epilog=EVAL_METRICS)
    c.add_argument("--traces", required=True, type=Path, help="directory of held-out traces (moe-predictor collect)")
    c.add_argument("--checkpoint", type=Path, default=None, help="trained forecaster to compare (without it: history methods only)")
    c.add_argument("--window", type=int, default=16, help="passes the window method averages")
    c.add_argument("--alpha", type=float, default=0.3, help="EMA weight of the newest pass")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    add_sru_impl_argument(c)
    c.set_defaults(fn=cmd_eval)

    c = sub.add_parser("serve", formatter_class=HelpFormatter, help="serve forecasts over gRPC")
    c.add_argument("--checkpoint", type=Path, default=None, help="trained forecaster (moe-predictor train)")
    c.add_argument("--model", default=None, help="the model (needed without a checkpoint)")
    c.add_argument("--cache-dir", type=Path, default=model_source.DEFAULT_CACHE_DIR,
                   help="where presets are built and hub checkpoints are kept")
    c.add_argument("--method", choices=["sru", "last", "window", "ema"], default=None,
                   help="default: sru with a checkpoint, window without")
    c.add_argument("--window", type=int, default=16, help="window method: passes averaged")
    c.add_argument("--alpha", type=float, default=0.3, help="ema method: weight of the newest pass")
    add_sru_impl_argument(c)
    c.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    c.add_argument("--port", type=int, default=50071, help="port to bind (0 = any free one)")
    c.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (0 = off); HOST is --host")
    tls.add_arguments(c)
    c.set_defaults(fn=cmd_serve)
    return p


def main(argv=None) -> int:
    serving.die_with_parent()
    a = build_parser().parse_args(argv)
    serving.configure_logging(a.log_level, a.log_format)
    from predictor_service.sru_kernel import SruKernelUnavailable

    try:
        return a.fn(a)
    except SruKernelUnavailable as exc:
        print(f"moe-predictor {a.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
