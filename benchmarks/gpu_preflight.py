#!/usr/bin/env python3
"""Can this Python run the project, and on which GPU? The first step of benchmarks/gpu_check.sh.

    python benchmarks/gpu_preflight.py [--json OUT/preflight.json]

Reads what the project needs from pyproject.toml: every [project] dependency, and pytest
from the test extras (the GPU tests need nothing else from them). Imports each package as
the project does and names every one that is missing, fails to import, or lies outside its
version range, with the range it needs. Then imports the services themselves (which checks
the generated gRPC stubs against the protobuf runtime), and prints torch, its CUDA build and
the devices, with one small matmul on each device to show that kernels run there.

Made for a machine where CUDA torch is installed system-wide and nothing can be downloaded
(shared/gpu/README.md): it only looks, it installs nothing.

Exit status: 0 when every package is usable and a CUDA device runs kernels; 1 when a
package is missing or of the wrong version; 2 when the packages are fine but no CUDA
device is usable (the message says why).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Distribution name -> the module the project imports. Names not listed import as
# themselves with '-' -> '_'.
IMPORT_NAME = {
    "huggingface-hub": "huggingface_hub",
    "grpcio": "grpc",
    "grpcio-health-checking": "grpc_health.v1.health",
    "grpcio-reflection": "grpc_reflection.v1alpha.reflection",
    "protobuf": "google.protobuf",
    "pyyaml": "yaml",
}
# From the test extras, what the GPU tests need; the rest (grpcio-tools, tritonclient, ...)
# serve CPU-only tests that gpu_check.sh does not collect.
TEST_PACKAGES = ("pytest",)
# sru JIT-compiles its kernels on first import (and with nvcc present, the CUDA one too):
# import it in a child process that may be stopped, not here.
SLOW_IMPORTS = {"sru": 120.0}
# The services' own entry modules: importing them checks that the stubs load.
PROJECT_MODULES = (
    "moe_protos.moe.expert.v1.expert_pb2_grpc",
    "moe_protos.moe.gateway.v1.gateway_pb2_grpc",
    "expert_server.server",
    "gateway.server",
)


def _requirement_class():
    try:
        from packaging.requirements import Requirement
    except ImportError:  # packaging comes with transformers, but pip vendors it too
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def read_requirements(pyproject: Path) -> list:
    """pyproject.toml -> [Requirement] of [project] dependencies plus TEST_PACKAGES."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    project = tomllib.loads(pyproject.read_text())["project"]
    Requirement = _requirement_class()
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for r in project.get("optional-dependencies", {}).get("test", [])
             if Requirement(r).name in TEST_PACKAGES]
    return [r for r in reqs if r.marker is None or r.marker.evaluate()]


def _import_in_child(module: str, timeout_s: float) -> str | None:
    """Import `module` in a fresh interpreter; None if it worked, else why not."""
    try:
        proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"import {module} did not finish in {timeout_s:.0f} s (its JIT kernel build?)"
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return lines[-1] if lines else f"import {module} exited with {proc.returncode}"
    return None


def check_package(req) -> dict:
    """Import one requirement and check its version: a dict with ok, have, where, problem."""
    dist = req.name.lower()
    module_name = IMPORT_NAME.get(dist, dist.replace("-", "_"))
    floors_first = sorted(req.specifier, key=lambda s: (not s.operator.startswith(">"), s.version))
    row = dict(package=req.name, needs=",".join(map(str, floors_first)) or "any version", module=module_name,
               have=None, where=None, ok=False, problem=None)
    try:
        row["have"] = metadata.version(req.name)  # the first one on sys.path: the one that imports
    except metadata.PackageNotFoundError:
        pass
    t0 = time.perf_counter()
    if dist in SLOW_IMPORTS:
        problem = _import_in_child(module_name, SLOW_IMPORTS[dist])
    else:
        try:
            module = importlib.import_module(module_name)
            problem = None
            top = sys.modules[module_name.split(".")[0]]
            where = getattr(top, "__file__", None) or getattr(module, "__file__", None)
            row["where"] = str(Path(where).parent) if where else None
            if isinstance(getattr(top, "__version__", None), str):
                row["have"] = top.__version__  # what actually imported wins over metadata
        except Exception as exc:  # noqa: BLE001 - any import failure is what we report
            problem = f"{type(exc).__name__}: {exc}".splitlines()[0]
    row["import_s"] = round(time.perf_counter() - t0, 2)
    if problem:
        row["problem"] = ("not installed" if row["have"] is None and "No module named" in problem
                          else f"does not import: {problem}")
    elif row["have"] is None:
        row["problem"] = "imports, but has no version metadata to check"
    elif not req.specifier.contains(row["have"], prereleases=True):
        row["problem"] = f"version {row['have']} is outside {req.specifier}"
    row["ok"] = row["problem"] is None
    return row


def check_project() -> list[dict]:
    rows = []
    for name in PROJECT_MODULES:
        try:
            importlib.import_module(name)
            rows.append(dict(module=name, ok=True, problem=None))
        except Exception as exc:  # noqa: BLE001
            rows.append(dict(module=name, ok=False, problem=f"{type(exc).__name__}: {exc}".splitlines()[0]))
    return rows


def cuda_report() -> dict:
    """torch, its CUDA build, and every visible device (with a matmul run on it)."""
    import torch

    out = dict(torch=torch.__version__, torch_cuda=torch.version.cuda, available=False, devices=[], reason=None,
               cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if torch.version.cuda is None:
        out["reason"] = f"this torch ({torch.__version__}) is a CPU-only build"
    elif visible is not None and visible.strip() in ("", "-1"):
        out["reason"] = f"CUDA_VISIBLE_DEVICES={visible!r} hides every device"
    elif not torch.cuda.is_available():
        out["reason"] = (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no device "
                         "(no GPU, or no driver: see nvidia-smi)")
    if out["reason"]:
        return out
    out["available"] = True
    out["cudnn"] = torch.backends.cudnn.version()
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        dev = dict(index=i, name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), kernels_run=False)
        try:
            a = torch.randn(256, 256, device=f"cuda:{i}")
            err = ((a @ a).cpu() - a.cpu() @ a.cpu()).abs().max().item()
            dev["kernels_run"] = err < 1e-2
            if not dev["kernels_run"]:
                dev["problem"] = f"a 256x256 matmul differs from the CPU's by {err}"
        except Exception as exc:  # noqa: BLE001 - e.g. no kernels for this architecture in this build
            dev["problem"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        out["devices"].append(dev)
    if not any(d["kernels_run"] for d in out["devices"]):
        out["available"] = False
        out["reason"] = "no device runs kernels: " + "; ".join(d.get("problem", "?") for d in out["devices"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, default=None, help="write the findings here as JSON")
    p.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # the project's own modules, as `python -m` from the root sees them

    print(f"python {platform.python_version()} at {sys.executable}")
    print(f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}")
    rows = [check_package(r) for r in read_requirements(a.pyproject)]
    width = max(len(r["package"]) for r in rows)
    for r in rows:
        status = "ok     " if r["ok"] else "MISSING" if r["have"] is None else "BAD    "
        print(f"  {status} {r['package']:<{width}}  needs {r['needs']:<14} have {r['have'] or '-':<14} "
              f"{r['problem'] or r['where'] or ''}")
    bad = [r for r in rows if not r["ok"]]
    project = check_project() if not any(r["package"] in ("torch", "grpcio", "protobuf") for r in bad) else []
    for r in project:
        if not r["ok"]:
            print(f"  BAD     project module {r['module']}: {r['problem']}")

    cuda = {}
    try:
        cuda = cuda_report()
    except Exception as exc:  # noqa: BLE001 - torch itself missing is already reported above
        cuda = dict(available=False, reason=f"torch does not import: {exc}", devices=[])
    print(f"torch {cuda.get('torch', '-')}, CUDA build {cuda.get('torch_cuda') or '-'}, cuDNN {cuda.get('cudnn') or '-'}")
    for d in cuda["devices"]:
        print(f"  cuda:{d['index']} {d['name']} (sm {d['capability']}, {d['memory_gib']} GiB): "
              f"{'kernels run' if d['kernels_run'] else d.get('problem')}")
    if not cuda["available"]:
        print(f"NO CUDA DEVICE: {cuda['reason']}")

    if bad or any(not r["ok"] for r in project):
        print("MISSING OR UNUSABLE, with the version each needs:")
        for r in bad:
            print(f"  {r['package']} {r['needs']}: {r['problem']}")
        for r in project:
            if not r["ok"]:
                print(f"  project module {r['module']}: {r['problem']}")
        status = 1
    else:
        status = 0 if cuda["available"] else 2
    device = next((d["name"] for d in cuda["devices"] if d["kernels_run"]), None)
    # One closing line: gpu_check.sh puts it in its summary.
    unusable = [r["package"] for r in bad] + [r["module"] for r in project if not r["ok"]]
    print("preflight: " + (f"{len(unusable)} missing or unusable ({', '.join(unusable)})" if unusable
                           else f"all {len(rows)} packages usable") + "; "
          + (f"CUDA on {device}" if device else f"NO CUDA DEVICE ({cuda['reason']})"))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(dict(
            date=date.today().isoformat(), host=platform.node(), python=platform.python_version(),
            device=device or "no CUDA device", cuda=cuda, packages=rows, project_modules=project,
            exit_status=status), indent=1) + "\n")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
