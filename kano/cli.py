"""The `kano` command line: parse options, call one library function per command, print results."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from kano.errors import KanoError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Kano: zero-shot anomaly detection with CLIP (KAnoCLIP).")
kb_app = typer.Typer(no_args_is_help=True, help="Build and inspect the LLM-VQA knowledge base (DuckDB).")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: synthetic defects, meta.json.")
app.add_typer(kb_app, name="kb")
app.add_typer(data_app, name="data")


def _parse_images(items: List[str]) -> dict[str, list[Path]]:
    from anomaly_data.io import list_images

    out: dict[str, list[Path]] = {}
    for item in items:
        cls, sep, folder = item.partition("=")
        if not sep or not cls or not folder:
            raise KanoError(f"--images must be CLASS=DIR, got {item!r}")
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
    llm_base_url: Optional[str] = typer.Option(None, "--llm-base-url", help="default: $OPENAI_BASE_URL"),
    vqa_base_url: Optional[str] = typer.Option(None, "--vqa-base-url", help="default: $KANO_VQA_BASE_URL"),
    temperature: float = typer.Option(0.7, "--temperature", help="LLM temperature"),
    vqa_temperature: float = typer.Option(0.2, "--vqa-temperature"),
    concurrency: int = typer.Option(4, "--concurrency"),
    retries: int = typer.Option(4, "--retries", help="retries per call on 429/5xx/timeouts/malformed replies"),
    backoff: float = typer.Option(1.0, "--backoff", help="first retry delay in seconds (doubles each time)"),
    timeout: float = typer.Option(120.0, "--timeout", help="seconds per HTTP request"),
    seed: int = typer.Option(0, "--seed"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the planned calls, make none"),
):
    """Ask the LLM (per class) and the VQA model (per image) for anomaly descriptions."""
    from kano import kb_command

    code = kb_command.build(classes=classes, kb=kb, llm=llm, vqa=vqa, images=_parse_images(images), data=data, n_llm=n_llm,
                            m_vqa=m_vqa, llm_base_url=llm_base_url, vqa_base_url=vqa_base_url, temperature=temperature,
                            vqa_temperature=vqa_temperature, concurrency=concurrency, retries=retries, backoff=backoff,
                            timeout=timeout, seed=seed, dry_run=dry_run)
    raise typer.Exit(code)


@kb_app.command("sql")
def kb_sql(
    query: str = typer.Argument(..., help="one SQL statement; the file is opened read-only"),
    kb: Path = typer.Option(Path("kb.duckdb"), "--kb"),
    fmt: str = typer.Option("table", "--format", help="table | csv | json"),
):
    """Query the knowledge base with SQL (read-only)."""
    from kano import ui
    from knowledge_store import run_sql

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
    from kano import kb_command

    kb_command.print_stats(kb, as_json)


@kb_app.command("export")
def kb_export(out: Path = typer.Argument(..., help="file.jsonl or file.parquet"), kb: Path = typer.Option(Path("kb.duckdb"), "--kb")):
    """Export descriptions (with provider and model) to JSONL or Parquet."""
    from knowledge_store import export

    n = export(kb, out)
    typer.echo(f"exported {n} descriptions to {out}")


@kb_app.command("import")
def kb_import(src: Path = typer.Argument(..., help="JSONL with class_name and text per line"),
              kb: Path = typer.Option(Path("kb.duckdb"), "--kb")):
    """Import descriptions from JSONL (source 'import'); existing ones are skipped."""
    from knowledge_store import import_jsonl

    added, skipped = import_jsonl(kb, src)
    typer.echo(f"imported {added} descriptions into {kb} ({skipped} already present)")


def main() -> None:
    try:
        app(standalone_mode=True)
    except KanoError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted: finished work is saved; run the same command again to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
