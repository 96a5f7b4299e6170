"""`kano compare` and `kano eval --method a,b,c`: one table per dataset in the KAnoCLIP paper's layout,
from hand-made metrics.json files with known numbers, and once end to end on the zero-parameter methods."""

import csv
import io
import json
import re

import pytest

from kano.evaluator import compare
from browser import check_page, no_external_references


def _result(folder, data, classes, name="m", kind="baseline", setting="per-image", backbone=None, run=None):
    """A result folder as `kano eval` leaves it, as far as compare reads it: metrics.json."""
    folder.mkdir(parents=True)
    method = {"kind": kind, "name": name, "setting": setting, "backbone": backbone, **({"run": run} if run else {})}
    (folder / "metrics.json").write_text(json.dumps({
        "dataset": data, "classes": {c: {"image_auroc": a, "pixel_auroc": p} for c, (a, p) in classes.items()},
        "mean": {}, "provenance": {"method": method, "data": data}}))
    return folder


@pytest.fixture
def three(tmp_path):
    """Three methods on one dataset; the numbers are chosen so that each column wins somewhere, with a tie
    (0.9 and 0.9 on bottle's image AUROC) and a None (cable's pixel AUROC of method b)."""
    a = _result(tmp_path / "a", "mvtec:/d", {"bottle": (0.9, 0.80), "cable": (0.6, 0.70)}, name="clip-ac", backbone="tiny")
    b = _result(tmp_path / "b", "mvtec:/d", {"bottle": (0.9, 0.85), "cable": (0.7, None)}, name="median_colour")
    c = _result(tmp_path / "c", "mvtec:/d", {"bottle": (0.5, 0.95), "cable": (0.8, 0.60)}, name="KAnoCLIP", kind="trained",
                backbone="tiny", run="/runs/exp1")
    return a, b, c


def _bold(md_row):
    """The bold cells of one Markdown row: [[bool per metric] per method]."""
    cells = [c.strip() for c in md_row.strip().strip("|").split("|")][1:]
    return [[v.startswith("**") for v in cell.split(" / ")] for cell in cells]


def test_best_in_bold_is_the_maximum_per_row_and_metric_with_ties_and_none(three):
    t, = compare.comparison_tables(compare.load_results(list(three)))
    assert [m["label"] for m in t["methods"]] == ["clip-ac (tiny)", "median_colour", "KAnoCLIP (exp1, tiny)"]
    rows = {r["class"]: r for r in t["rows"]}
    assert rows["bottle"]["best"] == [[True, False], [True, False], [False, True]]   # 0.9 = 0.9 both bold; 0.95 the top pixel
    assert rows["cable"]["best"] == [[False, True], [False, False], [True, False]]   # None never bold
    md = compare.to_markdown([t])
    line = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| ")}
    assert line["bottle"].strip() == "| bottle | **90.0** / 80.0 | **90.0** / 85.0 | 50.0 / **95.0** |"
    assert line["cable"].strip() == "| cable | 60.0 / **70.0** | 70.0 / - | **80.0** / 60.0 |"
    assert _bold(line["bottle"]) == rows["bottle"]["best"]


def test_the_mean_row_is_the_mean_of_the_classes(three):
    t, = compare.comparison_tables(compare.load_results(list(three)))
    mean = t["rows"][-1]
    assert mean["class"] == "mean"
    by_hand = [[(0.9 + 0.6) / 2, (0.80 + 0.70) / 2], [(0.9 + 0.7) / 2, 0.85], [(0.5 + 0.8) / 2, (0.95 + 0.60) / 2]]
    for got, want in zip(mean["values"], by_hand):
        assert got == pytest.approx(want)
    # image: 75.0, 80.0, 65.0 -> median_colour; pixel: 75.0, 85.0, 77.5 -> median_colour (its one class with masks)
    assert mean["best"] == [[False, False], [True, True], [False, False]]
    assert "| mean | 75.0 / 75.0 | **80.0** / **85.0** | 65.0 / 77.5 |" in compare.to_markdown([t])


def test_a_missing_class_shows_a_dash_and_leaves_no_mean(tmp_path):
    a = _result(tmp_path / "a", "mvtec:/d", {"bottle": (0.9, 0.8), "cable": (0.5, 0.5)}, name="x")
    b = _result(tmp_path / "b", "mvtec:/d", {"bottle": (0.7, 0.9)}, name="y")
    md = compare.to_markdown(compare.comparison_tables(compare.load_results([a, b])))
    assert "| cable | **50.0** / **50.0** | - / - |" in md
    assert "| mean | **70.0** / **65.0** | - / - |" in md


def test_two_datasets_make_two_tables_never_mixed(tmp_path):
    a = _result(tmp_path / "a", "mvtec:/d", {"bottle": (0.9, 0.8)}, name="x")
    b = _result(tmp_path / "b", "visa:/v", {"pcb1": (0.7, 0.6)}, name="x")
    c = _result(tmp_path / "c", "mvtec:/d", {"bottle": (0.6, 0.9)}, name="y")
    tables = compare.comparison_tables(compare.load_results([a, b, c]))
    assert [(t["data"], [m["label"] for m in t["methods"]], [r["class"] for r in t["rows"]]) for t in tables] == [
        ("mvtec:/d", ["x [a]", "y"], ["bottle", "mean"]), ("visa:/v", ["x [b]"], ["pcb1", "mean"])]
    md = compare.to_markdown(tables)
    assert md.count("| class |") == 2 and "## mvtec:/d" in md and "## visa:/v" in md


def test_transductive_methods_are_marked_placed_last_and_bold_among_themselves(tmp_path):
    m = _result(tmp_path / "m", "mvtec:/d", {"bottle": (0.99, 0.90)}, name="musc", setting="transductive", backbone="tiny")
    a = _result(tmp_path / "a", "mvtec:/d", {"bottle": (0.70, 0.80)}, name="darkness")
    r = _result(tmp_path / "r", "mvtec:/d", {"bottle": (0.95, 0.95)}, name="musc_randconv", setting="transductive")
    b = _result(tmp_path / "b", "mvtec:/d", {"bottle": (0.60, 0.85)}, name="brightness")
    t, = compare.comparison_tables(compare.load_results([m, a, r, b]))
    assert [x["label"] for x in t["methods"]] == ["darkness", "brightness", "musc (tiny)", "musc_randconv"]
    # per image: darkness's 70 beats 60, brightness's 85 beats 80, whatever musc scores; transductive among themselves
    assert t["rows"][0]["best"] == [[True, False], [False, True], [True, False], [False, True]]
    md = compare.to_markdown([t])
    assert "| class | darkness | brightness | musc (tiny)\u2020 | musc_randconv\u2020 |" in md
    assert "\u2020 transductive (musc (tiny), musc_randconv): sees a class's whole test set at once" in md
    assert "in percent" in md
    assert "musc (tiny)\u2020" in compare.to_html([t])


def test_a_lone_method_of_its_setting_is_never_bold(tmp_path):
    m = _result(tmp_path / "m", "mvtec:/d", {"bottle": (0.99, 0.99)}, name="musc", setting="transductive")
    a = _result(tmp_path / "a", "mvtec:/d", {"bottle": (0.70, 0.80)}, name="darkness")
    t, = compare.comparison_tables(compare.load_results([m, a]))
    assert all(not any(cell) for row in t["rows"] for cell in row["best"])
    assert "**" not in compare.to_markdown([t]).split("| class |")[1].split("Each cell")[0]


def test_csv_json_and_html_hold_the_same_numbers_and_provenance(three, tmp_path):
    tables = compare.compare_folders(list(three), tmp_path / "out")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "comparison.csv").read_text())))
    r = next(x for x in rows if x["class"] == "bottle" and x["method"] == "KAnoCLIP (exp1, tiny)" and x["metric"] == "pixel_auroc")
    assert r["value (%)"] == "95.0000" and r["best"] == "1" and r["kind"] == "trained" and r["run"] == "/runs/exp1"
    assert r["produced_by"] == str(three[2].resolve()) and r["setting"] == "per-image" and r["backbone"] == "tiny"
    j = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert j["tables"] == json.loads(json.dumps(tables)) and "fraction" in j["units"]
    assert set(j["produced_by"]) >= {"kano_version", "git_commit", "date"}
    assert j["tables"][0]["methods"][2]["method"]["run"] == "/runs/exp1"
    page = (tmp_path / "out" / "comparison.html").read_text()
    assert "<td>bottle</td><td><b>90.0</b> / 80.0</td><td><b>90.0</b> / 85.0</td><td>50.0 / <b>95.0</b></td>" in page
    assert "<script" not in page and no_external_references(page) == []


def test_out_is_claimed_like_eval_out(three, tmp_path, cli):
    out = tmp_path / "out"
    assert cli("compare", *three, "--out", out)[0] == 0
    assert cli("compare", *three, "--out", out)[0] == 0                      # the same comparison again: replaced
    code, _, err = cli("compare", *three[:2], "--out", out)
    assert code == 2 and "--out" in err and "--force" in err and "Traceback" not in err
    assert cli("compare", *three[:2], "--out", out, "--force")[0] == 0
    code, _, err = cli("compare", *three, "--out", three[0], "--force")
    assert code == 2 and "--out must be another folder than the RESULT_DIRs compared" in err
    assert (three[0] / "metrics.json").is_file()


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "nowhere", "RESULT_DIR must be a `kano eval` result folder (holding metrics.json), got no such folder"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "got a folder without metrics.json"),
    (lambda d: (d / "bad").mkdir() or (d / "bad" / "metrics.json").write_text("{not json") and d / "bad",
     "metrics.json must be the JSON that `kano eval` writes, got unreadable JSON"),
    (lambda d: (d / "odd").mkdir() or (d / "odd" / "metrics.json").write_text("[1, 2]") and d / "odd",
     "must hold \"classes\""),
])
def test_bad_input_says_what_must_be_and_exits_2(make, message, three, tmp_path, cli):
    code, out, err = cli("compare", three[0], make(tmp_path), "--out", tmp_path / "out")
    assert code == 2 and "error: " in err and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_bad_metrics_are_refused(three, tmp_path, cli):
    code, _, err = cli("compare", *three, "--out", tmp_path / "out", "--metrics", "image_auroc,speed")
    assert code == 2 and "--metrics must be a comma-separated list of distinct metrics, each one of image_auroc" in err
    assert "got 'image_auroc,speed'" in err


@pytest.mark.parametrize("methods, message", [
    ("median_colour,bogus", "--method must be a comma-separated list of distinct NAME (one of kanoclip-untrained, clip, clip-ac, winclip, retrieval, median_colour, darkness"),
    ("darkness,darkness", "got 'darkness,darkness' (a name twice)"),
    ("darkness,musc", "needs --backbone SPEC for musc"),
])
def test_eval_method_list_refuses_bad_names_before_anything_runs(methods, message, synth_root, tmp_path, cli):
    code, out, err = cli("eval", "--method", methods, "--data", f"mvtec:{synth_root}", "--out", tmp_path / "x")
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_eval_method_list_end_to_end_and_in_the_browser(synth_root, tmp_path, cli):
    out = tmp_path / "x"
    code, stdout, err = cli("eval", "--method", "median_colour,darkness", "--data", f"mvtec:{synth_root}", "--out", out,
                            "--image-size", "64", "--n-overlays", "1")
    assert code == 0, err
    m = {n: json.loads((out / n / "metrics.json").read_text()) for n in ("median_colour", "darkness")}
    assert m["darkness"]["provenance"]["method"]["name"] == "darkness"
    md = (out / "comparison.md").read_text()
    assert "| class | median_colour | darkness |" in md and "| class | median_colour | darkness |" in stdout
    for cls in ("disc", "weave", "mean"):
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {cls} |"))
        shown = [re.sub(r"\*", "", c.strip()).split(" / ") for c in line.strip().strip("|").split("|")[1:]]
        for cell, n in zip(shown, ("median_colour", "darkness")):
            v = m[n]["mean"] if cls == "mean" else m[n]["classes"][cls]
            assert cell == [f"{100 * v['image_auroc']:.1f}", f"{100 * v['pixel_auroc']:.1f}"]
    assert cli("eval", "--method", "median_colour,darkness", "--data", f"mvtec:{synth_root}", "--out", out,
               "--image-size", "64", "--n-overlays", "1")[0] == 0              # the same command again is accepted
    seen = check_page(out / "comparison.html")
    assert seen["errors"] == [] and seen["broken"] == [] and seen["title"] == "Kano comparison", seen
    assert "<b>" in (out / "comparison.html").read_text()
