"""Text that is on every machine with Python: the standard library's docstrings.

Used as the default text for benchmarks and trace collection, since no data set can
be downloaded here. One document per docstring, whitespace collapsed, in a fixed order.
Also: reading a user's corpus file into documents (split_documents).
"""

from __future__ import annotations

import importlib
import warnings

MODULES = [
    "argparse", "asyncio", "calendar", "collections", "concurrent.futures", "configparser", "contextlib",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools",
    "gettext", "heapq", "http.client", "http.server", "inspect", "ipaddress", "itertools", "json",
    "logging", "mailbox", "multiprocessing", "os", "pathlib", "pickle", "pydoc", "random", "re",
    "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "tkinter", "turtle", "typing", "unittest", "urllib.request", "uuid",
    "wave", "xml.dom.minidom", "zipfile",
]


def stdlib_documents(min_chars: int = 40) -> list[str]:
    """Docstrings of the modules above and their members, deduplicated, in a fixed order."""
    docs: dict[str, None] = {}
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # e.g. tkinter without Tk: skip it, the rest is plenty
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # e.g. typing.io, on touch
            for obj in [module, *(getattr(module, k) for k in sorted(vars(module)))]:
                doc = getattr(obj, "__doc__", None)
                if isinstance(doc, str) and len(doc) >= min_chars:
                    docs.setdefault(" ".join(doc.split()), None)
    return list(docs)


def stdlib_text() -> str:
    """The documents above as plain text: one paragraph each, separated by blank lines."""
    return "\n\n".join(stdlib_documents())


CORPUS_FORMATS = ("text", "lines")
DEFAULT_DOC_CHARS = 1000  # a packed document: about 250 tokens, more than one 128-token prompt


def split_documents(text: str, corpus_format: str = "text", doc_chars: int = DEFAULT_DOC_CHARS) -> list[str]:
    """The documents of a corpus file's text, whitespace collapsed, empty ones dropped.

    text: paragraphs separated by blank lines are documents. A text without a blank line
    (a book wrapped at 72 columns, source code, a licence) has no paragraph to go by, so its
    lines are packed in order into documents of at least doc_chars characters (the last
    may be shorter). lines: one document per line (JSON-lines style corpora)."""
    if corpus_format == "lines":
        return [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    if corpus_format != "text":
        raise ValueError(f"corpus format must be one of {CORPUS_FORMATS}, not {corpus_format!r}")
    if doc_chars < 1:
        raise ValueError(f"doc_chars must be >= 1, not {doc_chars}")
    lines = [" ".join(line.split()) for line in text.splitlines()]
    paragraphs, current = [], []
    for line in lines:
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    if len(paragraphs) > 1:
        return paragraphs
    docs, current = [], []
    for line in filter(None, lines):
        current.append(line)
        if sum(map(len, current)) + len(current) - 1 >= doc_chars:
            docs.append(" ".join(current))
            current = []
    if current:
        docs.append(" ".join(current))
    return docs


def read_documents(path, corpus_format: str = "text", doc_chars: int = DEFAULT_DOC_CHARS) -> list[str]:
    """split_documents of a UTF-8 file (undecodable bytes replaced)."""
    from pathlib import Path

    return split_documents(Path(path).read_text(encoding="utf-8", errors="replace"), corpus_format, doc_chars)


def _positive_int(text: str) -> int:
    import argparse

    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def add_corpus_arguments(p) -> None:
    """--corpus-format and --corpus-doc-chars, the same wherever --corpus is read."""
    p.add_argument("--corpus-format", default="text", choices=CORPUS_FORMATS,
                   help="text: paragraphs separated by blank lines are documents (a file without blank lines is "
                        "packed into documents of --corpus-doc-chars); lines: one document per line")
    p.add_argument("--corpus-doc-chars", type=_positive_int, default=DEFAULT_DOC_CHARS,
                   help="text without blank lines: characters per packed document (at least)")
