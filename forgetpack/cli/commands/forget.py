"""``forgetpack forget`` and ``forgetpack compose``: make a patch from class names.

torch and open_clip are imported inside the commands, so ``forgetpack --help`` stays light.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from forgetpack.format.errors import ForgetpackError
from forgetpack.format.names import check_disjoint, check_templates, clean_names, read_names_file, split_names

OUT = click.Path(path_type=Path)  # checked by _check_output: one clear line, not a usage error


def _check_output(path: Path) -> None:
    """Fail before any work if the patch could not be written there."""
    if path.is_dir():
        raise ForgetpackError(f"{path} is a directory; give a file name for the patch")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise ForgetpackError(f"{path}: output directory {parent} does not exist")


def _print_result(result: Any, output: Path, as_json: bool) -> None:
    report = result.report
    size = output.stat().st_size
    if as_json:
        data = {**report, "patch": str(output), "size_bytes": size, "digest": result.patch.digest}
        click.echo(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False))
        return
    from rich.table import Table
    from rich.text import Text

    from forgetpack.cli.render import console as make_console

    recipe, effect = report["recipe"], report["effect"]
    bare = recipe["templates"][0]
    table = Table(title=f"forgetpack forget · {report['model']}", title_justify="left")
    table.add_column("forget name", style="bold")
    table.add_column("forgotten")
    table.add_column("similarity to original", justify="right")
    table.add_column(f"now predicted as ({bare!r})")
    for name, e in effect["forget"].items():
        table.add_row(name, "yes" if e["forgotten"] else Text("NO", style="red"), f"{e['self_similarity']:+.3f}", e["predicted"][bare])
    console = make_console()
    console.print(table)
    info = Table(show_header=False, box=None)
    info.add_column(style="bold")
    info.add_column(overflow="fold")
    retained = effect["retained"]
    info.add_row("retained", f"{retained:.1%} of {effect['candidates'] - len(effect['forget'])} other candidates "
                 f"(worst template {effect['retained_min']:.1%}); vocabulary {effect['vocabulary_retained']:.1%}")
    info.add_row("preserve", f"{len(recipe['preserve'])} names ({recipe['preserve_mode']}), drift {effect['preserve_drift']:.4f}")
    if report["aliases"]:
        aliases = "; ".join(f"{f}: {', '.join(n for n, _ in a)}" for f, a in report["aliases"].items())
        info.add_row("aliases", f"{aliases} (not preserved; add them with --forget to forget them too)")
    info.add_row("solver", f"{recipe['solver']}, target {recipe['target']}, rank {report['rank']}, "
                 f"{len(recipe['templates'])} templates, {report['timings']['total']:.1f} s")
    info.add_row("patch", f"{output} ({size:,} bytes)")
    console.print(info)
    if retained < 0.98:
        click.echo(f"warning: only {retained:.1%} of the other candidates keep their class", err=True)


def _solve_options(solver: str | None, target: str | None, target_norm: str | None, templates: tuple[str, ...],
                   rank: int | None, seed: int | None) -> dict[str, Any]:
    options: dict[str, Any] = {"solver": solver, "target": target, "target_norm": target_norm, "rank": rank, "seed": seed}
    if templates:
        options["templates"] = list(templates)
    return options


_SOLVERS = click.Choice(["closed-form", "paper", "nullspace"])
_TARGETS = click.Choice(["antipode", "mirror", "empty"])
_NORMS = click.Choice(["original", "unit"])


@click.command()
@click.argument("model")
@click.option("--forget", "forget_names", multiple=True, required=True, help="A class name to forget (repeatable or comma-separated).")
@click.option("--preserve", "preserve", multiple=True, help="A class name to preserve (repeatable or comma-separated).")
@click.option("--preserve-file", type=click.Path(path_type=Path), help="UTF-8 file of names to preserve, one per line.")
@click.option("--auto-preserve", type=int, help="Preserve the K nearest vocabulary names of each forget name (default 20).")
@click.option("--vocabulary-file", type=click.Path(path_type=Path), help="Extra candidate names, one per line.")
@click.option("--solver", type=_SOLVERS, help="closed-form (default), paper, or nullspace.")
@click.option("--target", type=_TARGETS, help="Where forget prompts go: antipode (default), mirror, or empty (the paper's).")
@click.option("--target-norm", type=_NORMS, help="Target norm: original (default) or unit (the paper's).")
@click.option("--template", "templates", multiple=True, help="A prompt template with '{}' (repeatable; default: 5 common ones).")
@click.option("--rank", type=int, help="Rank of the update (default: the solver's).")
@click.option("--seed", type=int, help="Random seed (default 0).")
@click.option("-o", "--output", required=True, type=OUT, help="Where to write the patch.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def forget(model: str, forget_names: tuple[str, ...], preserve: tuple[str, ...], preserve_file: Path | None,
           auto_preserve: int | None, vocabulary_file: Path | None, solver: str | None, target: str | None,
           target_norm: str | None, templates: tuple[str, ...], rank: int | None, seed: int | None,
           output: Path, as_json: bool) -> None:
    """Make MODEL forget the --forget classes; write the patch to -o."""
    _check_output(output)
    chosen = [bool(preserve), preserve_file is not None, auto_preserve is not None]
    if sum(chosen) > 1:
        raise ForgetpackError("give only one of --preserve, --preserve-file, --auto-preserve")
    if rank is not None and rank <= 0:
        raise ForgetpackError(f"--rank must be a positive integer, got {rank}")
    if auto_preserve is not None and auto_preserve < 0:
        raise ForgetpackError(f"--auto-preserve must be ≥ 0, got {auto_preserve}")
    names = clean_names(split_names(forget_names), "forget")
    explicit = split_names(preserve) if preserve else read_names_file(preserve_file) if preserve_file is not None else None
    extra = read_names_file(vocabulary_file, "vocabulary") if vocabulary_file is not None else []
    if explicit is not None:
        check_disjoint(names, clean_names(explicit, "preserve"))
    if templates:
        check_templates(templates)

    from forgetpack.engine.models import load_model
    from forgetpack.engine.solve import forget as run_forget

    loaded = load_model(model)
    options = {k: v for k, v in _solve_options(solver, target, target_norm, templates, rank, seed).items() if v is not None}
    result = run_forget(loaded, names, preserve=explicit, auto_preserve=auto_preserve, vocabulary=extra,
                        progress=not as_json, **options)
    result.patch.save(output)
    _print_result(result, output, as_json)


@click.command()
@click.argument("model")
@click.argument("patches", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=OUT, help="Where to write the composed patch.")
@click.option("--solver", type=_SOLVERS, help="Override the recorded solver.")
@click.option("--rank", type=int, help="Rank of the update (default: the solver's).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def compose(model: str, patches: tuple[Path, ...], output: Path, solver: str | None, rank: int | None, as_json: bool) -> None:
    """One patch solved jointly for every request recorded in PATCHES."""
    from forgetpack.format.patch import read_patch

    _check_output(output)
    if rank is not None and rank <= 0:
        raise ForgetpackError(f"--rank must be a positive integer, got {rank}")
    loaded_patches = [read_patch(p) for p in patches]

    from forgetpack.engine.models import load_model
    from forgetpack.engine.solve import compose as run_compose

    loaded = load_model(model)
    result = run_compose(loaded, loaded_patches, progress=not as_json, solver=solver, rank=rank)
    result.patch.save(output)
    _print_result(result, output, as_json)
