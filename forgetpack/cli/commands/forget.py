"""``forgetpack forget`` and ``forgetpack compose``: make a patch from class names.

The options become a ``ForgetRequest``, which checks them all (before the model loads); the
command only reads name files, shows progress and prints the report. torch and open_clip are
imported inside the commands, so ``forgetpack --help`` stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from forgetpack.cli.options import FORCE, model_path
from forgetpack.cli.render import Table, hardening_summary, print_json, progress_bar, show, warn
from forgetpack.engine.request import DEFAULT_HARDEN_FAMILIES, DEFAULT_SOLVER, TARGET_NORMS, TARGETS, ForgetRequest
from forgetpack.engine.solvers import available_solvers
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.fileio import check_output_file
from forgetpack.format.names import read_names_file, split_names

OUT = click.Path(path_type=Path)  # checked by check_output_file: one clear line, not a usage error
RETAIN_WARNING = 0.98

_SOLVERS = click.Choice(sorted(available_solvers()))
_TARGETS = click.Choice(TARGETS)
_NORMS = click.Choice(TARGET_NORMS)


def _print_result(result: Any, output: Path, as_json: bool, command: str = "forget") -> None:
    report = result.report
    size = output.stat().st_size
    if as_json:
        print_json({**report, "patch": str(output), "size_bytes": size, "digest": result.patch.digest})
        _warn_unknown(report)
        _warn_rank(report)
        return
    from rich.text import Text

    recipe, effect = report["recipe"], report["effect"]
    bare = recipe["templates"][0]
    table = Table(title=f"forgetpack {command} · {report['model']}")
    table.add_column("forget name", style="bold")
    table.add_column("forgotten (text)")  # outranked in text space; on images: forgetpack eval
    table.add_column("similarity to original", justify="right")
    table.add_column(f"now predicted as ({bare!r})")
    for name, e in effect["forget"].items():
        table.add_row(name, "yes" if e["outranked"] else Text("NO", style="red"), f"{e['self_similarity']:+.3f}", e["predicted"][bare])
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
    hardened = hardening_summary(recipe, effect)
    if hardened:
        info.add_row("hardened", hardened)
    info.add_row("patch", f"{output} ({size:,} bytes)")
    show(table, info)
    if retained < RETAIN_WARNING:
        warn(f"only {retained:.1%} of the other candidates keep their class")
    _warn_unknown(report)
    _warn_rank(report)


def _warn_rank(report: dict[str, Any]) -> None:
    """A --rank above what the solve gives is not an error (the ceiling is known only once solved),
    but the patch's smaller rank is said, never silent."""
    asked, got = report["recipe"].get("rank"), report["rank"]
    if isinstance(asked, int) and got < asked:
        warn(f"--rank {asked}: the patch has rank {got}, the most the {report['recipe']['solver']} solver gives "
             "for this request (its exact optimum has no more independent directions)")


def _warn_unknown(report: dict[str, Any]) -> None:
    """Names let through by --allow-unknown: said again after the report, on stderr."""
    for u in report.get("recognition", {}).get("unknown", []):
        near = ", ".join(n for n, _ in u["nearest"])
        warn(f"{u['name']!r} is not a class {report['model']} recognises (nearest: {near}); forgotten as asked (--allow-unknown)")


def _given(**options: Any) -> dict[str, Any]:
    """The options the user gave (click passes None for the others, and () for no --template)."""
    return {k: v for k, v in options.items() if v is not None and v != ()}


@click.command()
@click.argument("model")
@click.option("--forget", "forget_names", multiple=True, required=True, help="A class name to forget (repeatable or comma-separated).")
@click.option("--preserve", "preserve", multiple=True, help="A class name to preserve (repeatable or comma-separated).")
@click.option("--preserve-file", type=click.Path(path_type=Path), help="UTF-8 file of names to preserve, one per line.")
@click.option("--auto-preserve", type=int, help="Preserve the K nearest vocabulary names of each forget name (default 20).")
@click.option("--vocabulary-file", type=click.Path(path_type=Path), help="Extra candidate names, one per line.")
@click.option("--solver", type=_SOLVERS, help=f"An installed solver ({DEFAULT_SOLVER} by default); see 'forgetpack backends'.")
@click.option("--target", type=_TARGETS, help="Where forget prompts go: mirror (default), antipode, or empty (the paper's).")
@click.option("--target-norm", type=_NORMS, help="Target norm: original (default) or unit (the paper's).")
@click.option("--template", "templates", multiple=True, help="A prompt template with '{}' (repeatable; default: 5 common ones).")
@click.option("--rank", type=int, help="Rank of the update (default: the solver's).")
@click.option("--seed", type=int, help="Random seed (default 0).")
@click.option("--harden/--no-harden", default=False, show_default=True,
              help="Solve again until the bypass grid (other phrasings, spellings, languages) is clean; see 'forgetpack audit'.")
@click.option("--harden-family", "harden_families", multiple=True,
              help="A bypass family to harden against (repeatable; default: templates, surface, lexicon, synonyms).")
@click.option("--allow-unknown", is_flag=True,
              help="Forget names the model does not recognise too (by default such a name is refused, with its nearest known names).")
@click.option("-o", "--output", required=True, type=OUT, help="Where to write the patch.")
@FORCE
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def forget(model: str, forget_names: tuple[str, ...], preserve: tuple[str, ...], preserve_file: Path | None,
           auto_preserve: int | None, vocabulary_file: Path | None, solver: str | None, target: str | None,
           target_norm: str | None, templates: tuple[str, ...], rank: int | None, seed: int | None,
           harden: bool, harden_families: tuple[str, ...], allow_unknown: bool, output: Path, force: bool,
           as_json: bool) -> None:
    """Make MODEL forget the --forget classes; write the patch to -o."""
    check_output_file(output, "patch", replace=force, inputs=[("the model", model_path(model)), ("the preserve file", preserve_file),
                                                            ("the vocabulary file", vocabulary_file)])
    if preserve and preserve_file is not None:
        raise ForgetpackError("give only one of --preserve, --preserve-file")
    explicit = split_names(preserve) if preserve else read_names_file(preserve_file) if preserve_file is not None else None
    extra = read_names_file(vocabulary_file, "vocabulary") if vocabulary_file is not None else ()
    if harden_families and not harden:
        raise ForgetpackError("--harden-family needs --harden")
    families = (tuple(harden_families) or DEFAULT_HARDEN_FAMILIES) if harden else ()
    request = ForgetRequest(split_names(forget_names), preserve=explicit, auto_preserve=auto_preserve, vocabulary=extra,
                            harden=families, allow_unknown=allow_unknown, **_given(solver=solver, target=target, target_norm=target_norm, templates=templates,
                                     rank=rank, seed=seed))

    from forgetpack.engine.solve import forget as run_forget
    from forgetpack.engine.weights import run_with_model

    with progress_bar(not as_json, first_step="reading the cache") as progress:  # warm: no model built when every feature is cached
        result = run_with_model(model, lambda loaded: run_forget(loaded, request, progress=progress),
                                loading=progress and progress.step)
    result.patch.save(output)
    _print_result(result, output, as_json)


@click.command()
@click.argument("model")
@click.argument("patches", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=OUT, help="Where to write the composed patch.")
@click.option("--solver", type=_SOLVERS, help="Override the recorded solver.")
@click.option("--rank", type=int, help="Rank of the update (default: the solver's).")
@click.option("--allow-unknown", is_flag=True, help="Let recorded forget names the model does not recognise through.")
@FORCE
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def compose(model: str, patches: tuple[Path, ...], output: Path, solver: str | None, rank: int | None,
            allow_unknown: bool, force: bool, as_json: bool) -> None:
    """One patch solved jointly for every request recorded in PATCHES."""
    from forgetpack.engine.request import check_composable
    from forgetpack.format.patch import read_patch

    check_output_file(output, "patch", replace=force, inputs=[("the model", model_path(model)), *(("a patch", p) for p in patches)])
    loaded_patches = [read_patch(p) for p in patches]
    check_composable(loaded_patches)  # what the files can tell, before the model loads

    from forgetpack.engine.solve import compose as run_compose
    from forgetpack.engine.weights import run_with_model

    with progress_bar(not as_json, first_step="reading the cache") as progress:
        result = run_with_model(model, lambda loaded: run_compose(loaded, loaded_patches, progress=progress,
                                                                  solver=solver, rank=rank,
                                                                  allow_unknown=allow_unknown),
                                loading=progress and progress.step)
    result.patch.save(output)
    _print_result(result, output, as_json, "compose")
