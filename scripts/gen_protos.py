#!/usr/bin/env python3
"""Generate the Python gRPC stubs in moe_protos/ from the .proto files in protos/.

This is the only way stubs are made; tests/test_protos.py regenerates them into a
temporary folder and fails when the committed copies drift.

    python scripts/gen_protos.py            # rewrite moe_protos/
    python scripts/gen_protos.py --out DIR  # write elsewhere (used by the drift test)

protoc sees protos/ under the virtual prefix ``moe_protos/``, so the generated
modules import each other as ``moe_protos.<path>`` and live in one package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
PACKAGE = "moe_protos"


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run protoc over every .proto; return the files written under out_dir."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    files = [f"{PACKAGE}/{p.relative_to(PROTO_DIR).as_posix()}" for p in proto_files()]
    args = [
        "protoc",
        f"-I{PACKAGE}={PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")
    # Regular packages (not namespace packages) so setuptools and mypy find them.
    for folder in [out_dir / PACKAGE, *(out_dir / PACKAGE).rglob("*")]:
        if folder.is_dir():
            (folder / "__init__.py").touch()
    return sorted(p for p in (out_dir / PACKAGE).rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="folder that receives moe_protos/")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
