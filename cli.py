"""The `kano` command line: parse options, call one library function per command, print results."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from kano.core.errors import KanoError, os_error_message


def _data_kinds() -> str:
    from kano.anomaly_data import READERS  # the one list of dataset kinds

    return ", ".join(READERS)


DATA_KINDS = _data_kinds()
DATA_HELP = f"dataset as KIND:PATH, KIND one of {DATA_KINDS} (e.g. mvtec:/data/mvtec_anomaly_detection)"


def _names(**query) -> str:
    """Method names from the one table (core/registry.py), comma-separated."""
    from kano.core.registry import methods_with

    return ", ".join(methods_with(**query))


def _per_image_with_backbone() -> str:
    return _names(needs="backbone", transductive=False)


def _with_option(option: str) -> str:
    from kano.core.registry import methods_with_option

    return ", ".join(methods_with_option(option))


def _untrained() -> str:
    from kano.core.registry import UNTRAINED_METHOD

    return UNTRAINED_METHOD


METHOD_HELP = ("a method instead of a model, or a comma-separated list of them (each into OUT/NAME, their comparison table "
               "into OUT; --backbone goes to the methods that take one). Zero-shot on --backbone SPEC: "
               f"{_names(kind='zero-shot')}. Zero-parameter, per image: {_names(kind='zero-parameter')}; transductive (sees "
               f"the whole test set): {_names(kind='transductive')} ({_names(kind='transductive', needs='backbone')} with "
               f"--backbone). Memory of labelled auxiliary features: {_names(kind='memory')} (with --backbone and --aux). "
               f"Trained methods ({_names(kind='trained')}) and one-class methods ({_names(kind='one-class')}): --run of a "
               "`kano train --method` run")


# Plain click help (rich_markup_mode=None): flags read "--force", not "--force <bool>", and help stays
# readable in logs and pipes; defaults show as "[default: ...]".
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Kano: zero-shot anomaly detection with CLIP (KAnoCLIP). Stages: kano kb build -> kano train -> "
                       "kano eval / kano predict; kano demo runs all three offline. Datasets are KIND:PATH, KIND one of "
                       f"{DATA_KINDS}. Run `kano COMMAND --help` for a command's options and defaults.")
kb_app = typer.Typer(no_args_is_help=True, help="Build and inspect the LLM-VQA knowledge base (DuckDB).")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: synthetic defects, meta.json.")


def _version(value: bool) -> None:
    if value:
        from kano import __version__

        typer.echo(f"kano {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Kano: zero-shot anomaly detection with CLIP (KAnoCLIP)."""


app.add_typer(kb_app, name="kb")
app.add_typer(data_app, name="data")


def _parse_images(items: List[str], flag: str = "--images") -> dict[str, list[Path]]:
    from kano.anomaly_data.io import list_images

    out: dict[str, list[Path]] = {}
    for item in items:
        cls, sep, folder = item.partition("=")
        if not sep or not cls or not folder:
            raise KanoError(f"{flag} must be CLASS=DIR, got {item!r}")
        out.setdefault(cls, []).extend(list_images(Path(folder)))
    return out


@kb_app.command("build")
def kb_build(
    classes: str = typer.Option(..., "--classes", help="comma-separated class names"),
    kb: Path = typer.Option(Path("kb.duckdb"), "--kb", help="knowledge-base file (created if missing)"),
    llm: str = typer.Option("builtin", "--llm", help="PROVIDER:MODEL (e.g. openai:gpt-3.5-turbo) or builtin"),
    vqa: str = typer.Option("none", "--vqa", help="PROVIDER:MODEL (openai:llama3.2-vision, transformers:meta-llama/...) or none"),
    images: List[str] = typer.Option([], "--images", help="CLASS=DIR: run VQA on every image in DIR (repeatable)"),
    data: Optional[str] = typer.Option(None, "--data", help="KIND:PATH: run VQA on the anomalous test images of a dataset"),
    n_llm: int = typer.Option(5, "--n-llm", help="LLM descriptions per class (paper: n=5)"),
    m_vqa: int = typer.Option(1, "--m-vqa", help="VQA descriptions per image (paper: m=1)"),
    llm_base_url: Optional[str] = typer.Option(None, "--llm-base-url", help="default: $OPENAI_BASE_URL; key: $OPENAI_API_KEY"),
    vqa_base_url: Optional[str] = typer.Option(None, "--vqa-base-url", help="default: $KANO_VQA_BASE_URL, else the LLM's "
                                               "server; key: $KANO_VQA_API_KEY (the LLM key only when VQA uses the LLM's server)"),
    temperature: float = typer.Option(0.7, "--temperature", help="LLM temperature"),
    vqa_temperature: float = typer.Option(0.2, "--vqa-temperature"),
    concurrency: int = typer.Option(4, "--concurrency"),
    retries: int = typer.Option(4, "--retries", help="retries per call on 429/5xx/timeouts/malformed replies"),
    backoff: float = typer.Option(1.0, "--backoff", help="first retry delay in seconds (doubles each time)"),
    timeout: float = typer.Option(120.0, "--timeout", help="seconds per model request, whole request (connect to last byte)"),
    seed: int = typer.Option(0, "--seed"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the planned calls, make none (writes no file)"),
    max_rounds: int = typer.Option(4, "--max-rounds", help="LLM calls per class at most, counted across runs: asking "
                                   "again for missing descriptions stops there"),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="when another build holds the same KB file: wait for it "
                              "(default), or refuse at once"),
):
    """Ask the LLM (per class) and the VQA model (per image) for anomaly descriptions."""
    from kano.kb_builder import command as kb_command

    code = kb_command.build(classes=classes, kb=kb, llm=llm, vqa=vqa, images=_parse_images(images), data=data, n_llm=n_llm,
                            m_vqa=m_vqa, llm_base_url=llm_base_url, vqa_base_url=vqa_base_url, temperature=temperature,
                            vqa_temperature=vqa_temperature, concurrency=concurrency, retries=retries, backoff=backoff,
                            timeout=timeout, seed=seed, dry_run=dry_run, max_rounds=max_rounds, wait=wait)
    raise typer.Exit(code)


@kb_app.command("sql")
def kb_sql(
    query: str = typer.Argument(..., help="one SQL statement; the file is opened read-only"),
    kb: Path = typer.Option(Path("kb.duckdb"), "--kb"),
    fmt: str = typer.Option("table", "--format", help="table | csv | json"),
):
    """Query the knowledge base with SQL (read-only)."""
    from kano.core import ui
    from kano.knowledge_store import run_sql

    if fmt not in ("table", "csv", "json"):
        raise KanoError(f"--format must be one of table, csv, json, got {fmt!r}")
    cols, rows = run_sql(kb, query)
    if fmt == "json":
        sys.stdout.write(json.dumps([dict(zip(cols, r)) for r in rows], default=str) + "\n")
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(cols)
        w.writerows(rows)
        sys.stdout.write(buf.getvalue())
    else:
        ui.print_table(None, cols, rows)


@kb_app.command("stats")
def kb_stats(kb: Path = typer.Option(Path("kb.duckdb"), "--kb"), as_json: bool = typer.Option(False, "--json")):
    """Descriptions per class and source, tokens, estimated cost, failures."""
    from kano.kb_builder import command as kb_command

    kb_command.print_stats(kb, as_json)


@kb_app.command("upgrade")
def kb_upgrade(kb: Path = typer.Option(Path("kb.duckdb"), "--kb")):
    """Apply pending schema migrations to a knowledge base written by an older Kano (nothing else changes)."""
    from kano.knowledge_store import upgrade

    before, after = upgrade(kb)
    typer.echo(f"{kb}: schema version {before} -> {after}" if after != before else f"{kb}: schema version {after}, up to date")


@kb_app.command("export")
def kb_export(out: Path = typer.Argument(..., help="file.jsonl or file.parquet"), kb: Path = typer.Option(Path("kb.duckdb"), "--kb")):
    """Export descriptions (with provider and model) to JSONL or Parquet."""
    from kano.knowledge_store import export

    n = export(kb, out)
    typer.echo(f"exported {n} descriptions to {out}")


@kb_app.command("import")
def kb_import(src: Path = typer.Argument(..., help="file.jsonl or file.parquet with class_name and text (what kb export writes)"),
              kb: Path = typer.Option(Path("kb.duckdb"), "--kb"),
              create: bool = typer.Option(False, "--create", help="start a new knowledge base if --kb does not exist")):
    """Import descriptions from JSONL or Parquet (source 'import'); existing ones are skipped."""
    from kano.knowledge_store import import_descriptions

    added, skipped = import_descriptions(kb, src, create=create)
    typer.echo(f"imported {added} descriptions into {kb} ({skipped} already present)")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., "--out", help="folder to write (MVTec layout + meta.json)"),
    classes: Optional[str] = typer.Option(None, "--classes", help="comma-separated; default all synthetic classes (or those of --world)"),
    world: Optional[str] = typer.Option(None, "--world", help="aux | target: the world's auxiliary classes with the defect kinds seen in training, or its target classes with every kind"),
    seed: int = typer.Option(0, "--seed"),
    size: int = typer.Option(256, "--size", help="image side in pixels (>= 32)"),
    n_train: int = typer.Option(4, "--n-train", help="normal training images per class"),
    n_good: int = typer.Option(6, "--n-good", help="normal test images per class"),
    n_defect: int = typer.Option(3, "--n-defect", help="images per defect kind per class"),
    defects: Optional[str] = typer.Option(None, "--defects", help="comma-separated kinds (default: every kind that applies to each class); see anomaly_data.DEFECTS"),
    force: bool = typer.Option(False, "--force", help="write into a folder that already holds files"),
    from_dir: Optional[Path] = typer.Option(None, "--from", help="a folder of your normal photos (or a class folder: its train/good): "
                                            "defects are synthesised on them (local: CutPaste, scar, DRAEM texture, colour, scratch, smear, "
                                            "missing; whole-image: contrast, blur, noise, lightness, colour_cast, rescale, rotate; "
                                            "--defects local or whole picks a half; --size is then the longest side kept); --classes names the class"),
    foreground: str = typer.Option("auto", "--foreground", help="with --from: auto (object vs border colour), none (whole photo) "
                                   "or a folder of masks, one per photo by stem; defects land only there"),
    strict: bool = typer.Option(False, "--strict", help="with --from: stop at an unreadable photo (default: name it, count it, leave it out and go on)"),
):
    """Write procedural textures/objects with exact-mask defects (deterministic), or defects on your own photos (--from)."""
    from kano.anomaly_data import synthesize, synthesize_world

    cls = [c.strip() for c in classes.split(",")] if classes else None
    kinds = tuple(d.strip() for d in defects.split(",")) if defects else None
    if from_dir is not None:
        from kano.anomaly_data.photo_defects import describe, synthesize_from_photos

        if world is not None or (cls and len(cls) > 1):
            raise KanoError(f"--from takes one class name in --classes and no --world, got --classes {classes} --world {world}")
        typer.echo(describe(synthesize_from_photos(from_dir, out, cls[0] if cls else None, seed=seed, max_side=size,
                                                   n_per_defect=n_defect, defects=kinds, foreground=foreground, force=force,
                                                   strict=strict)))
        return
    if world is not None:
        synthesize_world(out, world, seed=seed, size=size, n_train=n_train, n_good=n_good, n_per_defect=n_defect, classes=cls,
                         defects=kinds, force=force)
    else:
        synthesize(out, cls, seed=seed, size=size, n_train=n_train, n_good=n_good, n_per_defect=n_defect, defects=kinds, force=force)
    typer.echo(f"wrote synthetic dataset to {out} (meta.json included)")


@data_app.command("meta")
def data_meta(spec: str = typer.Argument(..., help="KIND:PATH"), out: Optional[Path] = typer.Option(None, "--out")):
    """Write the peers' meta.json for a dataset read from KIND:PATH."""
    from kano.anomaly_data import load_dataset, write_meta

    path = write_meta(load_dataset(spec, missing_masks="warn"), out)
    typer.echo(f"wrote {path}")


def _train_defaults():
    try:
        from kano.trainer import TrainConfig

        return TrainConfig(data="_")
    except Exception:  # help must never fail; an install without torch (pip install 'kano[runtime]') has no trainer
        return None


_TD = _train_defaults()
_MD = _TD.model if _TD else None


def _d(value) -> str:
    return f" (default: {value})"


def _int_list(name: str, raw: Optional[str], what: str = "block numbers (e.g. 6,12,18,24)") -> Optional[list[int]]:
    if raw is None:
        return None
    try:
        return [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise KanoError(f"{name} must be comma-separated {what}, got {raw!r}") from None


@app.command("train")
def train_cmd(
    method: Optional[str] = typer.Option(None, "--method", help=f"what to train: one of {_names(kind='trained')} (the paper's "
                                         "method first; docs/methods.md lists each one's source); the "
                                         "peers need no --kb and run with their published settings; or fit a one-class "
                                         f"method on the normal photos of --data's train/good: {_names(kind='one-class')}"
                                         + _d(_TD.method if _TD else _names(kind="trained").split(", ")[0])),
    kb: Optional[Path] = typer.Option(None, "--kb", help="knowledge base made by `kano kb build` (kanoclip only)" + _d(_TD.kb if _TD else "kb.duckdb")),
    data: Optional[str] = typer.Option(None, "--data", help="auxiliary dataset KIND:PATH, e.g. mvtec:/data/mvtec (its test "
                                       f"split, as in the paper; kinds: {DATA_KINDS}); required"),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="MODEL[:PRETRAINED] (a tag or a local weights file), micro (the shipped micro-CLIP), or tiny "
                                           "(random weights, for tests). The default needs CLIP weights downloaded once "
                                           "into the Hugging Face cache (see the README), or pass MODEL:/path/to/weights"
                                           + _d(_TD.backbone if _TD else "ViT-L-14-336-quickgelu:openai")),
    out: Optional[Path] = typer.Option(None, "--out", help="run directory: new, or an earlier run with --resume" + _d(_TD.out if _TD else "runs/kano")),
    config: Optional[Path] = typer.Option(None, "--config", help="JSON file with TrainConfig keys (and \"model\": {...}); flags override it"),
    classes: Optional[str] = typer.Option(None, "--classes", help="comma-separated training classes (default: every class of --data)"),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="input size in pixels (default: 518 for ViT-L-14-336, "
                                             "else the model's own)"),
    stages: Optional[str] = typer.Option(None, "--stages", help="comma-separated 1-based blocks whose patch tokens make maps "
                                         "(default: the method's published ones: 6,12,18,24 for 24 blocks, spread evenly "
                                         "otherwise; anomalyclip: the last block, 24)"),
    vv_start: Optional[int] = typer.Option(None, "--vv-start", help="first block of the V-V path, set apart from --stages "
                                           "(default: the method's published one, block 6 of 24)"),
    pos_resize: Optional[str] = typer.Option(None, "--pos-resize", help="how pretrained position embeddings are resampled to "
                                             "the image size: bicubic-antialias (open_clip), bilinear (AnomalyCLIP's code), "
                                             "bicubic (MuSc's code) (default: the method's authors' own; kanoclip: bilinear)"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="passes over the data (default: the method's authors' recipe: kanoclip and anomalyclip 15; aprilgan 3 on mvtec data, else 15; mvfa 50)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="images per step (per process) (default: the method's authors' recipe: 8; mvfa 1)"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate (default: the method's authors' recipe: 1e-3; mvfa 1e-4)"),
    class_words_rule: Optional[str] = typer.Option(None, "--class-words", help="the prompts' [class] word: kano (pcb1 -> "
                                                   "printed circuit board) or folder (the folder name as it is, as April-GAN's and MVFA-AD's code)  [default: kano]"),
    activation: Optional[str] = typer.Option(None, "--activation", help="the backbone's MLP activation: quickgelu or gelu "
                                             "(gelu: what April-GAN's 518 px and MVFA-AD's 240 px scripts run on ViT-L-14-336)  [default: what the weights were trained with]"),
    aug_rate: Optional[float] = typer.Option(None, "--aug-rate", help="share of samples made 2 x 2 mosaics of four images of "
                                             "their class, each epoch (April-GAN's; default: the method's recipe: aprilgan on mvtec data 0.2, else 0)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="random seed (initial prompts and heads, data order)" + _d(_TD.seed if _TD else 111)),
    n_ctx: Optional[int] = typer.Option(None, "--n-ctx", help="K, learnable prefix length (paper: 12)" + _d(_MD.n_ctx if _MD else 12)),
    sigma: Optional[float] = typer.Option(None, "--sigma", help="σ of the Gaussian smoothing the map, in pixels" + _d(_MD.sigma if _MD else 4.0)),
    cache: Optional[str] = typer.Option(None, "--cache", help="frozen-feature cache: auto | memory | disk | off" + _d(_TD.cache if _TD else "auto")),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="folder of the disk cache (default: ~/.cache/kano/features)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)"),
    workers: Optional[int] = typer.Option(None, "--workers", help="DataLoader worker processes for encoding images" + _d(_TD.workers if _TD else 0)),
    no_knpl: bool = typer.Option(False, "--no-knpl", help="ablation: fixed prompts"),
    no_vv: bool = typer.Option(False, "--no-vv", help="ablation: Q-K patch tokens"),
    no_bicmci: bool = typer.Option(False, "--no-bicmci", help="ablation: linear head + cosine"),
    no_adapter: bool = typer.Option(False, "--no-adapter", help="ablation: raw global feature"),
    text_free: bool = typer.Option(False, "--text-free", help="control: two learned vectors instead of text prompts (no KnPL)"),
    knowledge_sources: Optional[str] = typer.Option(
        None, "--knowledge-sources", help="KB sources feeding w̄ᵏ, e.g. llm,vqa,builtin (default llm,vqa; builtin/import "
        "only for a class with neither, with a warning)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last finished epoch"),
    allow_missing_masks: bool = typer.Option(False, "--allow-missing-masks",
                                             help="warn (not fail) when an anomalous image has no mask; its pixels count as normal"),
    holdout: Optional[float] = typer.Option(None, "--holdout", help="one-class methods: keep this fraction of the normal "
                                            "photos out of the fit and calibrate the run on them (split conformal, as "
                                            "`kano calibrate`), e.g. 0.25"),
    alarm_rate: float = typer.Option(0.05, "--alarm-rate", show_default=True, help="with --holdout: the share of new normal "
                                     "photos the calibration accepts to flag"),
):
    """Learn the prompts and fusion heads on an auxiliary dataset, or fit a one-class method on normal photos.

    Several processes train one run: torchrun --nproc_per_node N --no-python kano train ... (gloo on CPU, NCCL on CUDA).
    """
    from kano.trainer import command as train_command

    min_holdout = 0
    if holdout is not None:
        from kano.evaluator.calibrate import images_needed

        min_holdout = images_needed(alarm_rate)
    result = train_command.train(config, resume, allow_missing_masks=allow_missing_masks, holdout=holdout, min_holdout=min_holdout, overrides=dict(
        method=method, kb=str(kb) if kb else None, data=data, backbone=backbone, out=str(out) if out else None,
        classes=[c.strip() for c in classes.split(",")] if classes else None, image_size=image_size,
        stages=_int_list("--stages", stages), vv_start=vv_start, pos_resize=pos_resize, epochs=epochs, batch_size=batch_size, lr=lr,
        seed=seed, aug_rate=aug_rate, class_words=class_words_rule, activation=activation, n_ctx=n_ctx, sigma=sigma, cache=cache, cache_dir=cache_dir, device=device, workers=workers,
        use_knpl=False if (no_knpl or text_free) else None, text_free=True if text_free else None, use_vv=False if no_vv else None, use_bicmci=False if no_bicmci else None,
        use_adapter=False if no_adapter else None,
        knowledge_sources=[s.strip() for s in knowledge_sources.split(",") if s.strip()] if knowledge_sources is not None else None))
    if holdout is not None and isinstance(result, dict) and result.get("holdout_files"):
        from kano.core import ui
        from kano.evaluator import calibrate

        files = {c: [Path(f) for f in fs] for c, fs in result["holdout_files"].items()}
        cal = calibrate.calibrate(result["run_dir"], files, alarm_rate, progress=ui.progress_factory("calibrating on the held-out photos"),
                                  log=typer.echo, source="holdout")
        typer.echo(f"wrote {Path(result['run_dir']) / calibrate.CALIBRATION_FILE} (alarm rate {cal['alarm_rate']:g}, on "
                   f"{sum(len(v) for v in files.values())} held-out photos)")


@app.command("eval", short_help="Metrics per class, report.html and overlays on a dataset.")
def eval_cmd(
    data: str = typer.Option(..., "--data", help=DATA_HELP + "; its test split is evaluated"),
    run: Optional[Path] = typer.Option(None, "--run", help="a trained run directory (kano train --out); or give --backbone"),
    backbone: Optional[str] = typer.Option(None, "--backbone",
                                           help=f"instead of --run: the untrained KAnoCLIP with fixed prompts ({_untrained()}) on MODEL[:PRETRAINED], tiny or micro; with --method: the backbone of " + _names(needs="backbone")),
    out: Path = typer.Option(Path("results"), "--out", show_default=True,
                             help="results folder: report.html, metrics.json/.csv/.md, scores.csv, overlays/ (refused if it holds another run's results)"),
    classes: Optional[str] = typer.Option(None, "--classes", help="comma-separated classes to evaluate  [default: all]"),
    class_names: Optional[List[str]] = typer.Option(None, "--class", help="which class a folder of --data is: NAME (--data "
                                                    "holds one class folder) or NAME=FOLDER (repeatable); the name picks the "
                                                    "prompt word and the calibration, e.g. --class hazelnut=hazelnut_toy  "
                                                    "[default: the folder's name]"),
    batch_size: int = typer.Option(8, "--batch-size", show_default=True, help="images per forward pass (>= 1)"),
    workers: Optional[int] = typer.Option(None, "--workers",
                                          help="image-decoding processes (>= 0; 0: in the main process: on the CPU the batches run in parallel streams, one per torch thread (at most 4), each decoding its own images)  [default: usable CPU cores - 1, at most 8; 0 on two cores or fewer]"),
    image_size: Optional[int] = typer.Option(None, "--image-size",
                                             help="with --backbone only  [default: 518 for ViT-L-14-336, else the model's own]"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N  [default: cuda if available, else cpu]"),
    n_overlays: int = typer.Option(6, "--n-overlays", show_default=True,
                                   help="gallery panels per class (most/least confident, worst mistakes; >= 0)"),
    threshold: Optional[float] = typer.Option(None, "--threshold",
                                              help="decision threshold in [0, 1] for titles, overlays and histograms  [default: each class's in RUN/calibration.json (kano calibrate), else the run's; none for --backbone]"),
    force: bool = typer.Option(False, "--force", help="replace the results of a different run in --out"),
    allow_missing_masks: bool = typer.Option(False, "--allow-missing-masks",
                                             help="warn (not fail) when an anomalous image has no mask; its pixels count as normal"),
    method: Optional[str] = typer.Option(None, "--method", help=METHOD_HELP),
    aux: Optional[str] = typer.Option(None, "--aux", help=f"with --method {_names(needs='aux')}: the labelled auxiliary dataset KIND:PATH its memory is made of"),
    k_shot: int = typer.Option(0, "--k-shot", show_default=True, help="few-shot with this many normal reference images per class (the first K of each class's train split of --data, or of --reference, sorted by path): with --method " + _names(references=True) + ", the method's own few-shot mode (WinCLIP+); with --run or --backbone, April-GAN's memory of their patches added to the model's map; 0: zero-shot"),
    reference_sampling: Optional[str] = typer.Option(None, "--reference-sampling", help="with --k-shot: which train images: first (the first K by path) or seeded[:SEED] (K drawn with replacement, April-GAN's rule, seed 10)  [default: first]"),
    mutual: bool = typer.Option(False, "--mutual", help="fuse the method's map and image score with MuSc's on the same frozen backbone (mean of the two; Kano's own addition, transductive): with --run, --backbone, or --method " + _per_image_with_backbone()),
    reference: Optional[Path] = typer.Option(None, "--reference", help="with --k-shot K: a folder of normal images whose first K (sorted by path) are every class's references, instead of each class's train split"),
    class_word: Optional[str] = typer.Option(None, "--class-word", help="NAME=WORD[,NAME=WORD]: the prompts' [class] word for class NAME  [default: the run's word, else the built-in table (pcb1 -> printed circuit board), else the name with _ as spaces]"),
    strict: bool = typer.Option(False, "--strict", help="stop at an unreadable image (default: record it, count it, leave it out of the metrics and go on)"),
    rscin_windows: Optional[str] = typer.Option(None, "--rscin-windows", help=f"with --method {_with_option('rscin_windows')} or --mutual: MuSc's RsCIN windows, e.g. 1,8,9  [default: MuSc's published ones for the --data kind: visa 1,8,9; mvtec and every other kind 1,2,3]"),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="a calibration file of this scoring mode (`kano calibrate ... --calibration FILE`)  [default: RUN/calibration.json; one made for another mode is refused]"),
    model: Optional[Path] = typer.Option(None, "--model", help="instead of --run: an exported graph, FILE.onnx or FILE.xml with its sidecar FILE.json (kano export), scored on the CPU with its own classes, prompt words and thresholds: does the export score the data as its run did?"),
):
    """Image- and pixel-level metrics per class and their mean; report.html with curves and a gallery."""
    from kano.evaluator import command as eval_command
    from kano.evaluator.options import EvalOptions

    eval_command.evaluate_options(EvalOptions(
        data=data, run=run, backbone=backbone, out=out, classes=[c.strip() for c in classes.split(",")] if classes else None,
        batch_size=batch_size, workers=workers, image_size=image_size, device=device, n_overlays=n_overlays,
        threshold=threshold, force=force, allow_missing_masks=allow_missing_masks, method=method, aux=aux, mutual=mutual,
        k_shot=k_shot, reference=reference, class_words=class_word, reference_sampling=reference_sampling, strict=strict,
        rscin_windows=_int_list("--rscin-windows", rscin_windows, "window sizes >= 1 (e.g. 1,8,9)"), calibration=calibration,
        class_names=class_names, model=model))


@app.command("compare", short_help="Several eval results in one table per dataset (paper layout).")
def compare_cmd(
    results: List[Path] = typer.Argument(..., help="result folders of `kano eval` (each holding metrics.json)"),
    out: Path = typer.Option(..., "--out", help="folder: comparison.md/.csv/.json/.html (refused if it holds other results, unless --force)"),
    metrics: str = typer.Option("image_auroc,pixel_auroc", "--metrics", show_default=True,
                                help="comma-separated metrics per cell, of image_auroc, image_ap, image_f1_max, pixel_auroc, pixel_ap, pixel_f1_max, aupro"),
    force: bool = typer.Option(False, "--force", help="replace other results in --out"),
):
    """One table per dataset: a row per class and the mean, a column per method, the best per row in bold;
    transductive methods marked with a dagger."""
    from kano.evaluator import compare

    tables = compare.compare_folders(results, out, compare.parse_metrics(metrics), force=force)
    typer.echo(compare.to_markdown(tables))
    typer.echo(f"written to {out}: comparison.md, comparison.csv, comparison.json, comparison.html")


@app.command("predict", short_help="Score images: decision, panel, raw map, JSON line each.")
def predict_cmd(
    inputs: Optional[List[str]] = typer.Argument(None, help="image files, folders, glob patterns, .txt lists of paths, .csv/.parquet "
                                                 "manifests with a 'path' column (and optionally 'class'); or give --class NAME=FOLDER"),
    class_name: str = typer.Option(..., "--class", help="what the images show (e.g. bottle), or NAME=FOLDER: the photos of FOLDER "
                                   "are class NAME (e.g. hazelnut=hazelnut_toy/test); its prompt word by the rule of --class-word"),
    class_word: Optional[str] = typer.Option(None, "--class-word", help="the prompts' [class] word  [default: the run's word for --class, else the built-in table (pcb1 -> printed circuit board), else --class with _ as spaces]"),
    method: Optional[str] = typer.Option(None, "--method", help=f"a method that needs no training and scores one image at a time: {_names(per_image=True)} (on --backbone: {_names(per_image=True, needs='backbone')}; with --reference and --k-shot: {_names(per_image=True, references=True)}); transductive methods ({_names(kind='transductive')}) need a test set: use kano eval"),
    reference: Optional[Path] = typer.Option(None, "--reference", help="a folder of normal images of the class; its first --k-shot images (sorted by path) are the references: with --method " + _names(references=True) + ", the method's own few-shot mode (WinCLIP+); April-GAN's patch memory with --run or --backbone"),
    k_shot: int = typer.Option(0, "--k-shot", show_default=True, help="with --reference: how many of its images to use"),
    run: Optional[Path] = typer.Option(None, "--run", help="a trained run directory (kano train --out); or give --backbone"),
    backbone: Optional[str] = typer.Option(None, "--backbone",
                                           help="instead of --run: the untrained zero-shot baseline (or --method's backbone) on MODEL[:PRETRAINED], micro (the shipped micro-CLIP) or tiny (random weights, for tests)"),
    out: Path = typer.Option(Path("predictions"), "--out", show_default=True,
                             help="folder: index.html, predictions.jsonl, panels/, maps/ (refused if it holds another run's results)"),
    threshold: Optional[float] = typer.Option(None, "--threshold",
                                              help="decision threshold in [0, 1]  [default: the class's in RUN/calibration.json (kano calibrate), else the run's, calibrated on its auxiliary data]"),
    batch_size: int = typer.Option(8, "--batch-size", show_default=True, help="images per forward pass (>= 1)"),
    workers: int = typer.Option(0, "--workers", show_default=True, help="DataLoader worker processes (>= 0; 0: the main process)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N  [default: cuda if available, else cpu]"),
    force: bool = typer.Option(False, "--force", help="replace the results of a different run in --out"),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="input size in pixels with --backbone (default: the "
                                                                       "backbone's); a run uses its own"),
    maps: bool = typer.Option(True, "--maps/--no-maps", help="write each image's map (npy, 16-bit png); --no-maps for large runs"),
    panels: bool = typer.Option(True, "--panels/--no-panels", help="draw each image's panel; --no-panels for large runs"),
    fmt: str = typer.Option("jsonl", "--format", show_default=True, help="result file: jsonl (predictions.jsonl), or parquet (also predictions.parquet)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run in --out (refused if its options differ); "
                                                        "running the same command again does the same"),
    model: Optional[Path] = typer.Option(None, "--model", help="instead of --run: a graph from `kano export` (.onnx through onnxruntime, .xml through OpenVINO); needs no torch"),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="a calibration file of this scoring mode (`kano calibrate ... --calibration FILE`)  [default: RUN/calibration.json; one made for another mode is refused]"),
):
    """Score images as a stream: decision, labelled panel, raw map (NPY, 16-bit PNG), one JSON line each, index.html.

    Rows are appended a batch at a time, so a killed run continues where it stopped when run again. Under
    torchrun / accelerate launch each process scores its share and process 0 merges them into one file.
    Exit code 1 when some image could not be read (its row says why; the others are written)."""
    class_name, inputs = _class_and_inputs(class_name, inputs)
    from kano.evaluator.options import PredictOptions, run_predict

    run_predict(PredictOptions(
        inputs=inputs, class_name=class_name, out=out, run=run, backbone=backbone, method=method, model=model,
        class_word=class_word, reference=reference, k_shot=k_shot, threshold=threshold, batch_size=batch_size,
        workers=workers, device=device, force=force, image_size=image_size, maps=maps, panels=panels, fmt=fmt, resume=resume,
        calibration=calibration))


def _class_and_inputs(class_name: str, inputs: Optional[List[str]]) -> tuple[str, list[str]]:
    """`kano predict --class NAME=FOLDER`: FOLDER joins the inputs, NAME is the class."""
    name, eq, folder = (x.strip() for x in class_name.partition("="))
    if not name or (eq and not folder):
        raise KanoError(f"--class must be NAME or NAME=FOLDER (e.g. hazelnut=hazelnut_toy/test), got {class_name!r}")
    inputs = [*(inputs or []), *([folder] if eq else [])]
    if not inputs:
        raise KanoError("kano predict needs images: INPUTS (files, folders, globs, lists) or --class NAME=FOLDER, got none")
    return name, inputs


@app.command("calibrate", short_help="Per-class thresholds with a guaranteed false-alarm rate, from normal images.")
def calibrate_cmd(
    normal: List[str] = typer.Option(..., "--normal", help="CLASS=DIR: normal images of CLASS never used to train or as references (repeatable)"),
    alarm_rate: float = typer.Option(..., "--alarm-rate", help="A in (0, 1): the share of new normal images you accept to flag; "
                                     "needs at least 1/A - 1 images per class (A=0.1: 9)"),
    run: Optional[Path] = typer.Option(None, "--run", help="a trained run directory (kano train --out); or give --backbone"),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="instead of --run: the untrained zero-shot baseline (or --method's backbone): MODEL[:PRETRAINED], micro or tiny"),
    method: Optional[str] = typer.Option(None, "--method", help="a method that needs no training, as kano predict takes it: clip, clip-ac, winclip (WinCLIP+ with --reference and --k-shot), or a per-image zero-parameter floor (median_colour, ...)"),
    reference: Optional[Path] = typer.Option(None, "--reference", help="as kano predict: a folder of normal images whose first --k-shot (sorted by path) are the references"),
    k_shot: int = typer.Option(0, "--k-shot", show_default=True, help="with --reference: how many of its images to use"),
    class_word: Optional[str] = typer.Option(None, "--class-word", help="WORD (one --normal class) or NAME=WORD[,NAME=WORD]: the prompts' [class] word, as kano predict will use it  [default: the run's word, else the built-in table, else the name with _ as spaces]"),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="the calibration file to write (then pass it to predict, eval, export, serve)  [default: RUN/calibration.json for a run scored as it is; required for every other mode]"),
    out: Optional[Path] = typer.Option(None, "--out", help="also write each image's score (calibration_scores.csv) and a copy of the calibration here"),
    batch_size: int = typer.Option(8, "--batch-size", show_default=True, help="images per forward pass (>= 1)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N  [default: cuda if available, else cpu]"),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="input size in pixels with --backbone (default: the backbone's); a run uses its own"),
    strict: bool = typer.Option(False, "--strict", help="stop at an unreadable image (default: name it, count it, leave it out and go on)"),
):
    """Split conformal calibration of whatever kano predict runs (the same --run/--backbone/--method/--reference/--k-shot/
    --class-word): each class's image threshold is the ceil((n+1)(1-A))-th smallest score of its n normal images, so new
    normal images are flagged at most at rate A. The file is keyed by that scoring mode; predict, eval, export and
    serve use it for that mode only and refuse it, naming what differs, for any other."""
    from kano.core import ui
    from kano.anomaly_data.names import parse_class_words
    from kano.evaluator import calibrate
    from kano.evaluator.command import check_common, detector

    check_common(batch_size)
    if not run and not backbone and not method:
        raise KanoError("kano calibrate needs what kano predict scores with: --run RUN, --backbone SPEC or --method NAME "
                        "(with --backbone for the methods that take one), got none of them")
    if calibration is None and (not run or reference):
        raise KanoError(f"--calibration FILE must name where to write the calibration of this scoring mode "
                        f"({'few-shot on a run (--reference)' if run else '--method ' + method if method else '--backbone ' + str(backbone)}), "
                        f"got none: only a run scored as it is keeps its calibration in the run folder; pass the same "
                        f"--calibration FILE to predict, eval, export and serve")
    images = _parse_images(normal, "--normal")
    words = {}
    if class_word:
        if "=" in class_word:
            words = parse_class_words(class_word)
        elif len(images) == 1:
            words = {next(iter(images)): class_word.strip()}
        else:
            raise KanoError(f"--class-word must be NAME=WORD[,NAME=WORD] with several --normal classes, got {class_word!r}")
        unknown = sorted(set(words) - set(images))
        if unknown:
            raise KanoError(f"--class-word names must be --normal classes ({', '.join(images)}), got {', '.join(unknown)}")
    det = detector(run=run, backbone=backbone, method=method, reference=reference, k_shot=k_shot, device=device,
                   batch_size=batch_size, image_size=image_size)
    cal = calibrate.calibrate_detector(det, images, alarm_rate, calibration, class_words=words,
                                       progress=ui.progress_factory("calibrating"), log=typer.echo, out=out, strict=strict)
    dest = calibration or calibrate.default_destination(det)
    typer.echo(f"wrote {dest} (alarm rate {cal['alarm_rate']:g}; classes {', '.join(sorted(cal['classes']))}; mode "
               f"{cal['mode']['method']}" + (f", K={cal['mode']['k_shot']}" if cal['mode']['k_shot'] else "") + ")"
               + ("" if dest == calibrate.default_destination(det) else f"; pass --calibration {dest} to predict, eval, export and serve"))


@app.command("export", short_help="A run (or a zero-shot method) as one ONNX graph or OpenVINO IR, text side baked in.")
def export_cmd(
    out: Path = typer.Option(..., "--out", help="the graph: PATH.onnx (--format onnx) or PATH.xml (+ .bin, --format openvino); PATH.json beside it"),
    classes: str = typer.Option(..., "--classes", help="comma-separated class names the graph scores (their text features are stored in it)"),
    run: Optional[Path] = typer.Option(None, "--run", help=f"a trained run directory (of {_names(exportable=True, trained=True)})"),
    fmt: str = typer.Option("onnx", "--format", show_default=True, help="onnx or openvino"),
    method: Optional[str] = typer.Option(None, "--method", help=f"instead of --run, with --backbone: {_names(exportable=True, trained=False)}; left out: {_untrained()}. Trained methods ({_names(exportable=True, trained=True)}) are exported from their run"),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="with --method or alone: MODEL[:PRETRAINED], micro or tiny"),
    fp16: bool = typer.Option(False, "--fp16", help="with --format openvino: store the weights in half precision (compress_to_fp16)"),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="the calibration of this mode whose thresholds the graph carries  [default: RUN/calibration.json]"),
):
    """Export the image side (backbone, heads, scoring) with the classes' text features and the run's threshold as constants."""
    from kano.deploy import command as deploy_command

    deploy_command.export(run=run, method=method, backbone=backbone, classes=classes, fmt=fmt, out=out, fp16=fp16,
                          calibration=calibration)


@app.command("serve", short_help="HTTP service: POST /v1/predict, GET /healthz, GET / (a page to drop images on).")
def serve_cmd(
    run: Optional[Path] = typer.Option(None, "--run", help="a trained run directory (scored with torch)"),
    model: Optional[Path] = typer.Option(None, "--model", help="instead of --run: an exported .onnx or .xml (no torch)"),
    host: str = typer.Option("127.0.0.1", "--host", show_default=True, help="address to bind; other than loopback needs --public"),
    port: int = typer.Option(8000, "--port", show_default=True),
    public: bool = typer.Option(False, "--public", help="allow --host to be a non-loopback address (reachable from other machines)"),
    classes: Optional[str] = typer.Option(None, "--classes", help="the class names the service accepts: with --run any (their prompt words by the usual rule), with --model some of the exported ones  [default: the run's, or every exported class]"),
    folder: Optional[Path] = typer.Option(None, "--folder", help="the service's own folder (uploads are decoded there)  [default: a new temporary folder]"),
    batch: int = typer.Option(8, "--batch", show_default=True, help="images per forward pass"),
    batch_wait_ms: float = typer.Option(5.0, "--batch-wait-ms", show_default=True, help="how long a batch waits to fill"),
    queue_length: int = typer.Option(64, "--queue", show_default=True, help="images waiting at most; more: 503 with Retry-After"),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", show_default=True, help="largest request body, MB (413 above); pixels: $KANO_MAX_PIXELS"),
    timeout_s: float = typer.Option(30.0, "--timeout", show_default=True, help="seconds a request may take (504 after)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="inference threads (onnxruntime or OpenVINO with --model, torch with --run)  [default: $OMP_NUM_THREADS, else all cores; torch's own with --run]"),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="with --run: a calibration file of the run's mode  [default: RUN/calibration.json]; an exported --model carries its own"),
):
    """Serve a detector over HTTP (FastAPI on uvicorn); loopback only unless --public."""
    from kano.deploy import command as deploy_command

    deploy_command.serve(run=run, model=model, host=host, port=port, public=public, classes=classes, folder=folder, batch=batch,
                         batch_wait_ms=batch_wait_ms, queue_length=queue_length, max_upload_mb=max_upload_mb, timeout_s=timeout_s,
                         threads=threads, calibration=calibration)


@app.command("demo")
def demo_cmd(out: Path = typer.Option(Path("demo_out"), "--out"), epochs: int = typer.Option(8, "--epochs"),
             seed: int = typer.Option(0, "--seed"),
             backbone: Optional[str] = typer.Option(None, "--backbone", help="default: the demo's backbone (demo.DEMO_BACKBONE)"),
             baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="also score the untrained baseline, the zero-parameter detectors and the transductive floor")):
    """Offline end to end in the synthetic world: train on its auxiliary classes, evaluate zero-shot on unseen ones beside the baselines."""
    from kano import demo
    demo.run(out, epochs=epochs, seed=seed, backbone=backbone or demo.DEMO_BACKBONE, baselines=baselines)


def main() -> None:
    try:
        app(standalone_mode=True)
    except KanoError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted: finished work is saved; run the same command again to resume", err=True)
        sys.exit(130)
    except OSError as exc:  # the disk or the file system said no: a folder that cannot be made, a full disk, no permission
        typer.secho(f"error: {os_error_message(exc)}", fg="red", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
