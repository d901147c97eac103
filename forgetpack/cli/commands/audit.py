"""``forgetpack audit``: every bypass family tried on a patched model against its base.

The library (``forgetpack.evaluation.audit``) does the work and returns data; this command reads
the options, shows progress while text is encoded and renders the tables. torch and open_clip are
imported inside the command, so ``forgetpack --help`` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from forgetpack.cli.render import Table, echo, print_json, progress_bar, show
from forgetpack.format.names import split_names

PROBE_NOTE = ("image-side probes read no text: a patch of the text projection leaves every image embedding as it was, "
              "so they find the forgotten class exactly as before")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _variant_text(v: dict[str, Any] | None) -> str:
    return "-" if v is None else f"{v['label']!r} in {v['template']!r} ({v['dataset']})"


def _render(report: Any) -> None:
    text = report.text
    table = Table(title=f"text space · {report.model} · forget {', '.join(report.forget)} (bypass: reaching the name "
                  "after the patches; opened: one the base model did not recognise)")
    table.add_column("family")
    columns = ("tried", "recognised", "bypasses", "opened")
    for column in (*columns, "share"):
        table.add_column(column, justify="right")
    for family in report.families:
        row = text.get(family, {})
        table.add_row(family, *(str(row.get(c, 0)) for c in columns), _percent(row.get("bypass_share", 0.0)))
    renderables: list[Any] = [table]
    if report.datasets:
        renderables.append(_images_table(report))
    if report.probes:
        probes = Table(title="image-side probes (recall of the forgotten class on test images)")
        for column in ("dataset", "class", "test images", "1-NN", "linear probe"):
            probes.add_column(column, justify="left" if column in ("dataset", "class") else "right")
        for p in report.probes:
            probes.add_row(p.dataset, p.name, str(p.test_images), _percent(p.nearest_neighbour), _percent(p.linear_probe))
        renderables.append(probes)
    show(*renderables)
    for o in report.bypasses[:10]:
        how = "now reaches" if o.opened else "still reaches"
        echo(f"bypass: {o.variant.prompt!r} ({o.variant.family}, {o.variant.kind}) {how} {o.variant.name!r}")
    if len(report.bypasses) > 10:
        echo(f"… and {len(report.bypasses) - 10} more bypasses (--json lists them all)")
    if report.probes and all(p.unchanged for p in report.probes):
        echo(f"note: {PROBE_NOTE}")


def _images_table(report: Any) -> Table:
    """Per family: variants the base recognises on images, and the accuracy they recover after the patches."""
    from forgetpack.evaluation.audit import MIN_RECOGNISED

    images = report.image_summary()
    table = Table(title=f"images ({', '.join(report.datasets)}): variants on which the base model gets at least "
                  f"{MIN_RECOGNISED:.0%} of the class, accuracy after the patches")
    table.add_column("family")
    for column in ("counted", "worst", "mean"):
        table.add_column(column, justify="right")
    table.add_column("worst variant", overflow="fold")
    for family in report.families:
        im = images.get(family, {"counted": 0, "worst": None, "mean": None, "worst_variant": None})
        table.add_row(family, str(im["counted"]), _percent(im["worst"]), _percent(im["mean"]), _variant_text(im["worst_variant"]))
    return table


@click.command()
@click.argument("model")
@click.option("--patch", "patches", multiple=True, required=True, type=click.Path(path_type=Path), metavar="P",
              help="Patch file to apply (repeatable, in order).")
@click.option("--forget", "forget_names", multiple=True, required=True, metavar="NAME",
              help="A class the patches forget (repeatable or comma-separated).")
@click.option("--dataset", "datasets", multiple=True, metavar="D",
              help="mnist, digits, letters, quickdraw, quickdraw-345, fashion or imagefolder:DIR: measure bypasses on real images too (repeatable).")
@click.option("--variants", "variants_file", type=click.Path(path_type=Path), metavar="FILE",
              help="Your own variants: UTF-8 lines 'name<TAB>variant[<TAB>variant…]' (tried by the lexicon family).")
@click.option("--family", "families", multiple=True, metavar="F",
              help="A bypass family to try (repeatable or comma-separated; default: every installed one).")
@click.option("--alias-tokens", type=click.IntRange(0), metavar="N",
              help="Search only the first N vocabulary tokens for the model's aliases (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (instead of the tables).")
def audit(model: str, patches: tuple[Path, ...], forget_names: tuple[str, ...], datasets: tuple[str, ...],
          variants_file: Path | None, families: tuple[str, ...], alias_tokens: int | None, as_json: bool) -> None:
    """Try every way of asking for the --forget classes on MODEL with --patch applied, against MODEL itself.

    \b
    Example:
      forgetpack audit mini --patch seven.fpatch --forget seven --dataset mnist
    """
    from forgetpack.engine.variants import get_family, read_lexicon
    from forgetpack.evaluation.audit import audit as run_audit
    from forgetpack.evaluation.audit import check_request

    lexicon = read_lexicon(variants_file) if variants_file is not None else {}
    chosen = [f for f in split_names(families) if f] or None
    for family in chosen or ():
        get_family(family)  # an unknown family is one line, before the model loads
    loaded_patches, names, data = check_request(list(patches), split_names(forget_names), list(datasets))

    from forgetpack.engine.models import load_model

    loaded = load_model(model)
    with progress_bar(not as_json) as progress:
        report = run_audit(loaded, loaded_patches, names, datasets=list(data.values()), families=chosen,
                           lexicon=lexicon, progress=progress, max_tokens=alias_tokens)
    if as_json:
        print_json(report.to_json())
    else:
        _render(report)
