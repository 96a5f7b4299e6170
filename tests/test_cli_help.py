"""The command line's eval/predict/global parts: help with defaults for every option,
the dataset kinds listed, flags without type noise, value checks with clear messages."""

import click
import pytest
import typer

from kano.anomaly_data import READERS


def _command(*path):
    from kano import cli
    cmd = typer.main.get_command(cli.app)
    for p in path:
        cmd = cmd.commands[p]
    return cmd


@pytest.mark.parametrize("path", [(), ("eval",), ("predict",), ("compare",)])
def test_every_option_has_help_and_defaults_show(path, cli):
    cmd = _command(*path)
    code, out, err = cli(*path, "--help")
    assert code == 0, err
    for p in cmd.params:
        if isinstance(p, click.Option):
            assert p.help and p.help.strip(), f"{'/'.join(path) or 'kano'} {p.opts} has no help"
            if p.default not in (None, False) and not p.is_flag:
                assert f"[default: {p.default}]" in " ".join(out.split()), (p.opts, out)
    assert "<bool>" not in out                                  # flags read --force, not --force <bool>


def test_data_help_lists_every_kind(cli):
    import kano.cli as cli_module
    assert [k.strip() for k in cli_module.DATA_KINDS.split(",")] == list(READERS)
    for args in (("eval", "--help"), ("--help",)):
        code, out, _ = cli(*args)
        text = " ".join(out.split())
        assert code == 0 and all(f"{k}," in text or f"{k} " in text or f"{k}." in text for k in READERS), text


@pytest.mark.parametrize("args,message", [
    (["eval", "--data", "mvtec:{d}", "--threshold", "1.5"], "--threshold must be a number in [0, 1] (scores are in [0, 1]), got 1.5"),
    (["eval", "--data", "mvtec:{d}", "--threshold", "-0.1"], "--threshold must be a number in [0, 1] (scores are in [0, 1]), got -0.1"),
    (["eval", "--data", "mvtec:{d}", "--workers", "-1"], "--workers must be an integer >= 0 (0: load in the main process), got -1"),
    (["eval", "--data", "mvtec:{d}", "--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["eval", "--data", "mvtec:{d}", "--n-overlays", "-2"], "--n-overlays must be an integer >= 0, got -2"),
    (["predict", "{d}", "--class", "hazelnut", "--threshold", "2"], "--threshold must be a number in [0, 1] (scores are in [0, 1]), got 2.0"),
    (["predict", "{d}", "--class", "hazelnut", "--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["predict", "{d}", "--class", "hazelnut", "--workers", "-1"], "--workers must be an integer >= 0 (0: load in the main process), got -1"),
])
def test_bad_values_say_what_must_be_and_what_was_given(args, message, hazelnut_root, tmp_path, cli):
    args = [a.format(d=hazelnut_root) for a in args]
    code, out, err = cli(*args, "--backbone", "tiny", "--out", tmp_path / "o")
    assert code == 2, (out, err)
    assert f"error: {message}" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()                       # refused before anything was written


def test_n_overlays_sets_the_gallery_size(hazelnut_root, tmp_path, cli):
    code, _, err = cli("eval", "--backbone", "tiny", "--data", f"mvtec:{hazelnut_root}", "--out", tmp_path / "e", "--n-overlays", "2")
    assert code == 0, err
    assert len(list((tmp_path / "e" / "overlays").glob("*.png"))) == 2
