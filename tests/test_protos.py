"""The committed stubs in moe_protos/ must be exactly what scripts/gen_protos.py makes."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_match_protos(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    gen = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = gen
    spec.loader.exec_module(gen)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in gen.generate(tmp_path)}
    committed = {p.relative_to(ROOT): p.read_bytes() for p in (ROOT / "moe_protos").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert sorted(fresh) == sorted(committed), "stub files differ: run python scripts/gen_protos.py"
    stale = [str(p) for p in fresh if fresh[p] != committed[p]]
    assert not stale, f"stale stubs {stale}: run python scripts/gen_protos.py"
