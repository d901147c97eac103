"""``forgetpack index``, ``rescore`` and ``search``: embed a collection once, then forget over it in seconds."""

from __future__ import annotations

from pathlib import Path

import click

from forgetpack.cli.commands.classify import _labels
from forgetpack.cli.options import FORCE
from forgetpack.cli.render import Table, echo, key_value_table, print_json, progress_bar, show
from forgetpack.format.errors import ForgetpackError

PATCH = click.Path(dir_okay=False, path_type=Path)
KEY = click.Path(dir_okay=False, path_type=Path)
SHOWN_FAILURES = 20


@click.command()
@click.argument("source")
@click.option("--model", default=None, metavar="DIR_OR_MODEL", help="Export directory (onnx) or model spec that embeds the images.")
@click.option("-o", "--output", "index", default=None, metavar="INDEX", help="The index (a LanceDB folder, or an object-storage URI).")
@click.option("--verify", is_flag=True, help="Check the index named by SOURCE instead: every row read, norms and digests checked.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="Embed on Ray Data: a local instance, or the cluster at ADDRESS.")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True, help="Ray actors (one runtime session each).")
@click.option("--batch", type=click.IntRange(1), default=32, show_default=True, help="Images per forward pass.")
@click.option("--shard-size", type=click.IntRange(1), default=1024, show_default=True, help="Images per committed shard.")
@click.option("--threads", type=int, default=None, help="Intra-op threads per session.")
@click.option("--column", default=None, help="Parquet/CSV: the column holding image bytes or paths.")
@click.option("--resume", is_flag=True, help="Continue (or add to) an existing index; finished shards are skipped.")
@click.option("--ann/--no-ann", default=None, help="Build the ANN index now (default: once the table has 100,000 rows).")
@FORCE
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def index(source: str, model: str | None, index: str | None, verify: bool, ray_address: str | None, workers: int,
          batch: int, shard_size: int, threads: int | None, column: str | None, resume: bool, ann: bool | None,
          force: bool, as_json: bool) -> None:
    """Embed the images of SOURCE (a folder, a .txt list of paths, or a .parquet/.csv table) into INDEX.

    With --verify, SOURCE is an index to check: exit 1 with one line naming the damage."""
    from forgetpack.format.fileio import check_output_dir
    from runtime.index import build_index

    if verify:
        if model or index or resume or force or ray_address:
            raise ForgetpackError("--verify checks the index given as SOURCE; give it alone (with --json if wanted)")
        _verify(source, as_json)
        return
    for given, name in ((model, "--model"), (index, "-o/--output")):
        if not given:
            raise click.UsageError(f"Missing option '{name}'.")
    if resume and force:
        raise ForgetpackError("give only one of --resume (add to INDEX) and --force (build it anew)")
    if "://" not in index:  # an existing index needs --resume or --force; never the source or the model
        check_output_dir(index, replace=resume or force, inputs=[("the image source", _local(source)),
                                                                 ("the model", _local(model))])

    with progress_bar(not as_json, "embedding images") as bar:
        report = build_index(
            source, index, model, engine="ray" if ray_address else "local", resume=resume, batch=batch,
            shard_size=shard_size, threads=threads, column=column, workers=workers, ann=ann, force=force,
            ray_address=None if ray_address in (None, "local") else ray_address,
            progress=(lambda p: bar(p.items_done, p.items_total)) if bar else None,
        )
    summary = {
        "index": report.index, "engine": report.engine, "items": report.items, "rows": report.rows,
        "added": report.added, "already_indexed": report.already_indexed, "duplicates": report.duplicates,
        "failed": report.failed, "skipped": {"images": report.skipped, "unreadable": report.skipped_unreadable},
        "failures": [{"image": k, "reason": r} for k, r in report.failures],
        "shards": {"total": report.shards_total, "skipped": report.shards_skipped, "committed": report.shards_committed,
                   "repaired": report.repaired},
        "ann_index": report.ann_index, "seconds": round(report.seconds, 3), "images_per_s": round(report.images_per_s, 2),
    }
    if as_json:
        print_json(summary)
        return
    show(key_value_table(f"index {report.index}", [
        ("engine", report.engine), ("images", f"{report.items:,} listed, {report.added:,} added, "
                                              f"{report.already_indexed:,} already indexed, {report.failed:,} unreadable"
                                              + (f" (and {report.skipped_unreadable:,} an earlier run could not read)"
                                                 if report.skipped_unreadable else "")),
        ("shards", f"{report.shards_committed} committed, {report.shards_skipped} done before"
                   + (f", {report.repaired} half-committed redone" if report.repaired else "")),
        ("rows", f"{report.rows:,}" + (" (ANN index built)" if report.ann_index else "")),
        ("throughput", f"{report.images_per_s:.1f} images/s over {report.seconds:.1f} s"),
    ]))
    for key, reason in report.failures[:SHOWN_FAILURES]:
        echo(f"unreadable: {key}: {reason}")
    if report.failed > SHOWN_FAILURES:
        echo(f"… and {report.failed - SHOWN_FAILURES} more (--json lists them all)")


def _verify(index: str, as_json: bool) -> None:
    from runtime.index import verify_index

    report = verify_index(index)
    if as_json:
        print_json({"index": report.index, "rows": report.rows, "shards": report.shards, "damaged": report.damaged,
                    "not_unit": report.not_unit, "duplicates": report.duplicates,
                    "digest_mismatch": report.digest_mismatch, "missing_rows": report.missing_rows,
                    "uncommitted": report.uncommitted, "digests": report.digests, "examples": report.examples})
    if report.damaged:
        raise ForgetpackError(f"{report.index}: the index is damaged: {report.summary()}; re-index it (--force)")
    if not as_json:
        echo(f"{report.index}: {report.rows:,} rows in {report.shards:,} shards checked: no damage found"
             + ("" if report.digests else " (norms only: made before digests were recorded)")
             + (f"; {report.uncommitted:,} rows of a killed run, redone by the next --resume" if report.uncommitted else ""))


def _local(path: str) -> Path | None:
    """A local file or folder the command reads (None for a model spec or a URI)."""
    return Path(path) if path and "://" not in path and Path(path).exists() else None


@click.command()
@click.argument("index")
@click.option("--labels", "labels_text", required=True, help="Comma-separated class names.")
@click.option("--template", "templates", multiple=True, help="Prompt template with {} (repeatable; averaged).")
@click.option("--patch", "patches", multiple=True, type=PATCH, help="Apply this patch (repeatable, in order).")
@click.option("--model", default=None, metavar="DIR_OR_MODEL", help="The model for the text side (default: the one the index records).")
@click.option("--key", "keys", multiple=True, type=KEY, help="Accept only patches signed by one of these public keys.")
@click.option("-o", "--output", "out", type=click.Path(path_type=Path), default=None, help="Write one row per image (Parquet).")
@click.option("--compare", is_flag=True, help="Also classify without the patches and show what moved.")
@FORCE
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def rescore(index: str, labels_text: str, templates: tuple[str, ...], patches: tuple[Path, ...], model: str | None,
            keys: tuple[Path, ...], out: Path | None, compare: bool, force: bool, as_json: bool) -> None:
    """Classify every image of INDEX over --labels under the patches, from the stored embeddings."""
    from forgetpack.format.fileio import check_output_file
    from runtime.index import rescore as run_rescore

    if out is not None:
        check_output_file(out, "rescore output", replace=force, inputs=[
            ("the model", _local(model or "")), *(("a patch", p) for p in patches), *(("a public key", k) for k in keys)])

    with progress_bar(not as_json, "rescoring") as bar:
        report = run_rescore(index, _labels(labels_text), list(templates) or None, list(patches), model=model, out=out,
                             compare=compare, trusted_keys=list(keys) or None, progress=bar)
    if as_json:
        print_json({
            "index": report.index, "rows": report.rows, "labels": report.labels, "templates": report.templates,
            "patches": report.patches, "counts": report.counts, "base_counts": report.base_counts,
            "changed": report.changed if compare else None, "moved": report.moved if compare else None,
            "output": report.output, "seconds": round(report.seconds, 3),
        })
        return
    table = Table(title=f"{report.rows:,} images, {len(report.patches)} patch(es), {report.seconds:.2f} s")
    table.add_column("label")
    if compare:
        table.add_column("base", justify="right")
    table.add_column("images", justify="right")
    if compare:
        table.add_column("moved to", overflow="fold")
    for label in report.labels:
        row = [label]
        if compare and report.base_counts is not None:
            row.append(f"{report.base_counts[label]:,}")
        row.append(f"{report.counts[label]:,}")
        if compare:
            row.append(", ".join(f"{to} {n:,}" for to, n in sorted(report.moved.get(label, {}).items(), key=lambda kv: -kv[1])))
        table.add_row(*row)
    show(table)
    if compare:
        echo(f"{report.changed:,} of {report.rows:,} images changed label")
    if report.output:
        echo(f"wrote {report.output}")


@click.command()
@click.argument("index")
@click.argument("query")
@click.option("-k", "k", type=click.IntRange(1, 10_000), default=10, show_default=True, help="How many images.")
@click.option("--patch", "patches", multiple=True, type=PATCH, help="Apply this patch (repeatable, in order).")
@click.option("--template", "templates", multiple=True, help="Embed the query through these templates (averaged).")
@click.option("--model", default=None, metavar="DIR_OR_MODEL", help="The model for the text side (default: the one the index records).")
@click.option("--key", "keys", multiple=True, type=KEY, help="Accept only patches signed by one of these public keys.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def search(index: str, query: str, k: int, patches: tuple[Path, ...], templates: tuple[str, ...], model: str | None,
           keys: tuple[Path, ...], as_json: bool) -> None:
    """The K images of INDEX closest to the text QUERY, with the patches applied."""
    from runtime.index import search as run_search

    if not query.strip():
        raise ForgetpackError("the query is empty")
    report = run_search(index, query, k, list(patches), model=model, templates=list(templates) or None,
                        trusted_keys=list(keys) or None)
    if as_json:
        print_json({"index": report.index, "query": report.query, "patches": report.patches, "ann": report.ann,
                    "seconds": round(report.seconds, 4),
                    "hits": [{"path": h.path, "content_hash": h.content_hash, "score": round(h.score, 6)} for h in report.hits]})
        return
    table = Table(title=f"{report.query} ({len(report.patches)} patch(es), {'ANN' if report.ann else 'exact'})")
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("image", overflow="fold")
    for rank, hit in enumerate(report.hits, 1):
        table.add_row(str(rank), f"{hit.score:.4f}", hit.path)
    show(table)
