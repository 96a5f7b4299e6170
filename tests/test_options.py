"""Every option is honoured or refused, never dropped: each option of `kano eval` and `kano predict` walked against
a method of each kind (and against a list of methods, a run's size, an exported graph): where the registry entry
says the method cannot use it, the command exits 2 naming the option, before anything is written.

Options that apply to every source (data, out, batch size, ...) are listed as such; a new option must be put in one
of the two groups here, or this test fails."""

import pytest
import typer

from kano.core.registry import METHODS, methods_with

KINDS = ("zero-shot", "zero-parameter", "transductive", "memory")
# one method of each kind the table holds (the first of each), as `--method NAME` runs it
REPRESENTATIVE = {k: methods_with(kind=k)[0] for k in KINDS if methods_with(kind=k)}


def _options(command: str) -> set[str]:
    import kano.cli

    group = typer.main.get_command(kano.cli.app)
    cmd = group.commands[command]
    return {opt for p in cmd.params if p.param_type_name == "option" for opt in (*p.opts, *p.secondary_opts)
            if opt.startswith("--")} - {"--help"}


# eval: option -> (value, whether --method NAME can use it, from its registry entry)
EVAL_PER_METHOD = {
    "--run": ("some/run", lambda s: False),
    "--backbone": ("tiny", lambda s: "backbone" in s.needs),
    "--aux": ("AUX", lambda s: "aux" in s.needs),
    "--k-shot": ("1", lambda s: s.references),
    "--reference": ("REF", lambda s: s.references),
    "--reference-sampling": ("seeded", lambda s: s.references),
    "--class-word": ("disc=disc", lambda s: s.prompts),
    "--rscin-windows": ("1,2", lambda s: "rscin_windows" in s.options),
    "--mutual": (None, lambda s: not s.transductive and "backbone" in s.needs),
    "--model": ("some/model.onnx", lambda s: False),  # an exported graph is the model: no --method beside it
}
EVAL_GENERAL = {"--data", "--out", "--classes", "--batch-size", "--workers", "--image-size", "--device", "--n-overlays",
                "--threshold", "--force", "--allow-missing-masks", "--method", "--strict", "--calibration", "--class"}

PREDICT_PER_METHOD = {
    "--run": ("some/run", lambda s: False),
    "--backbone": ("tiny", lambda s: "backbone" in s.needs),
    "--reference": ("REF", lambda s: s.references),
    "--k-shot": ("1", lambda s: s.references),
    "--class-word": ("disc", lambda s: s.prompts),
    "--image-size": ("32", lambda s: False),  # a method scores at its own size in predict
}
PREDICT_GENERAL = {"--class", "--out", "--threshold", "--batch-size", "--workers", "--device", "--force", "--maps",
                   "--no-maps", "--panels", "--no-panels", "--format", "--resume", "--method", "--model", "--calibration"}


def test_every_option_is_classified():
    assert _options("eval") == EVAL_GENERAL | set(EVAL_PER_METHOD)
    assert _options("predict") == PREDICT_GENERAL | set(PREDICT_PER_METHOD)


def _args(method: str, table: dict, option: str, synth_root, tmp_path) -> list[str]:
    spec = METHODS[method]
    value = table[option][0]
    value = {"AUX": f"mvtec:{synth_root}", "REF": str(synth_root / "disc" / "train" / "good")}.get(value, value)
    args = ["--method", method]
    if "backbone" in spec.needs and option != "--backbone":
        args += ["--backbone", "tiny"]
    if "aux" in spec.needs and option != "--aux":
        args += ["--aux", f"mvtec:{synth_root}"]
    return args + [option] + ([] if value is None else [value])


@pytest.mark.parametrize("kind", list(REPRESENTATIVE))
def test_eval_refuses_each_option_its_method_cannot_use(kind, cli, synth_root, tmp_path):
    method = REPRESENTATIVE[kind]
    walked = 0
    for option, (_, usable) in EVAL_PER_METHOD.items():
        if usable(METHODS[method]):
            continue
        out = tmp_path / option.strip("-")
        code, _, err = cli("eval", *_args(method, EVAL_PER_METHOD, option, synth_root, tmp_path), "--data",
                           f"mvtec:{synth_root}", "--out", out, "--image-size", "32", "--classes", "disc")
        assert code == 2 and option in err and "Traceback" not in err, (kind, option, err)
        assert not out.exists(), (kind, option)
        walked += 1
    assert walked >= 3, kind


@pytest.mark.parametrize("kind", [k for k in REPRESENTATIVE if METHODS[REPRESENTATIVE[k]].per_image])
def test_predict_refuses_each_option_its_method_cannot_use(kind, cli, synth_root, tmp_path):
    method = REPRESENTATIVE[kind]
    image = next((synth_root / "disc" / "test" / "good").iterdir())
    for option, (_, usable) in PREDICT_PER_METHOD.items():
        if usable(METHODS[method]):
            continue
        out = tmp_path / option.strip("-")
        code, _, err = cli("predict", image, "--class", "disc", *_args(method, PREDICT_PER_METHOD, option, synth_root, tmp_path),
                           "--out", out)
        assert code == 2 and option in err and "Traceback" not in err, (kind, option, err)
        assert not out.exists(), (kind, option)


@pytest.mark.parametrize("option,value", [("--mutual", None), ("--k-shot", "1"), ("--reference", "REF"),
                                          ("--rscin-windows", "1,2"), ("--calibration", "cal.json")])
def test_eval_refuses_one_methods_options_with_a_list(option, value, cli, synth_root, tmp_path):
    value = str(synth_root) if value == "REF" else value
    code, _, err = cli("eval", "--method", "darkness,brightness", option, *([value] if value else []), "--data",
                       f"mvtec:{synth_root}", "--out", tmp_path / "e")
    assert code == 2 and f"{option} must go with one --method" in err
    assert not (tmp_path / "e").exists()


def test_eval_list_refuses_class_words_none_of_its_methods_uses(cli, synth_root, tmp_path):
    code, _, err = cli("eval", "--method", "darkness,brightness", "--class-word", "disc=disc", "--data", f"mvtec:{synth_root}",
                       "--out", tmp_path / "e")
    assert code == 2 and "--class-word is used by the methods that score with prompts" in err


def test_eval_list_honours_strict(cli, synth_root, tmp_path):
    """--strict reaches each method of a list: an unreadable test image stops the list at its first method."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    (root / "disc" / "test" / "good" / "zz_broken.png").write_bytes(b"not a png")
    code, _, err = cli("eval", "--method", "darkness,brightness", "--strict", "--data", f"mvtec:{root}", "--classes", "disc",
                       "--out", tmp_path / "e", "--image-size", "32", "--n-overlays", "0", "--workers", "0")
    assert code == 2 and "zz_broken.png" in err, err
    code, _, err = cli("eval", "--method", "darkness,brightness", "--data", f"mvtec:{root}", "--classes", "disc",
                       "--out", tmp_path / "f", "--image-size", "32", "--n-overlays", "0", "--workers", "0")
    assert code == 0, err  # without --strict the image is recorded and left out


def test_eval_refuses_image_size_with_a_run(cli, synth_root, tmp_path):
    code, _, err = cli("eval", "--run", tmp_path / "run", "--image-size", "64", "--data", f"mvtec:{synth_root}",
                       "--out", tmp_path / "e")
    assert code == 2 and "--image-size is used with --backbone or --method only" in err


@pytest.mark.parametrize("option,value", [("--workers", "2"), ("--device", "cpu"),
                                          ("--class-word", "thing"), ("--image-size", "64"), ("--run", "r"),
                                          ("--backbone", "tiny"), ("--method", "clip"), ("--k-shot", "1"),
                                          ("--calibration", "cal.json")])
def test_predict_model_refuses_what_a_graph_cannot_use(option, value, cli, tmp_path):
    code, _, err = cli("predict", tmp_path, "--class", "a", "--model", tmp_path / "m.onnx", option, *([value] if value else []),
                       "--out", tmp_path / "p")
    assert code == 2 and f"got {option}" in err and "beside it" in err, err
    assert not (tmp_path / "p").exists()


def test_serve_run_honours_threads(trained_run):
    """kano serve --run --threads N: torch scores with N threads (the option reaches the torch scorer)."""
    import torch

    from kano.core.errors import KanoError
    from kano.deploy.serve import Scorer

    before = torch.get_num_threads()
    try:
        Scorer.torch_run(trained_run, threads=1)
        assert torch.get_num_threads() == 1
        with pytest.raises(KanoError, match="--threads must be an integer >= 1, got 0"):
            Scorer.torch_run(trained_run, threads=0)
    finally:
        torch.set_num_threads(before)
