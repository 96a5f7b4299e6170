"""bench/table1.py's rows: one per registry method of the Table 1 setting (trained ones per seed and fused with
MuSc), none for the one-class methods; nothing is built or trained here (the rows' builders are lazy)."""

import importlib.util
import sys
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_table1", ROOT / "bench" / "table1.py")
t1 = importlib.util.module_from_spec(_spec)
sys.modules["bench_table1"] = t1
_spec.loader.exec_module(t1)


def test_rows_cover_every_method_of_the_setting(tmp_path):
    from kano.core.registry import METHODS

    rows = t1.entries(Namespace(backbone="micro", epochs=1), "mvtec:aux", "mvtec:target", tmp_path / "kb.duckdb",
                      tmp_path, [0, 1])
    keys = [r[0] for r in rows]
    assert len(keys) == len(set(keys))
    trained = [m for m, s in METHODS.items() if s.kind == "trained"]
    assert "mvfa" in trained
    for m in trained:                      # each trained method at both seeds, alone and with --mutual
        assert {f"{m}/s0", f"{m}/s1", f"{m}+mutual/s0", f"{m}+mutual/s1"} <= set(keys), m
    one_class = {m for m, s in METHODS.items() if s.kind == "one-class"}
    assert one_class and not one_class & {k.split("/")[0] for k in keys}
    others = {m for m, s in METHODS.items() if s.kind not in ("trained", "one-class")}
    assert {"untrained" if k == "kanoclip-untrained" else k for k in others} <= set(keys)
    assert len(keys) == 4 * len(trained) + len(others)
    by_key = {r[0]: r for r in rows}
    assert by_key["mvfa/s1"][1:4] == ("MVFA-AD", "trained on aux", 1)
    assert by_key["mvfa+mutual/s0"][2] == "transductive" and by_key["untrained"][2] == "untrained"
