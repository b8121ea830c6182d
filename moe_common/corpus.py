"""Text that is on every machine with Python: the standard library's docstrings.

Used as the default text for benchmarks and trace collection, since no data set can
be downloaded here. One document per docstring, whitespace collapsed, in a fixed order.
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
    return "\n".join(stdlib_documents())
