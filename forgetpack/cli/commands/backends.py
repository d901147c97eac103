"""``forgetpack backends``: what this install can run: runtime backends, onnxruntime providers, solvers.

Read from entry points and onnxruntime only, so listing needs no torch.
"""

from __future__ import annotations

from typing import Any

import click

from forgetpack.cli.render import Table, print_json, show


def _providers() -> dict[str, Any]:
    try:
        import onnxruntime
    except ImportError:
        return {"installed": False, "available": []}
    return {"installed": True, "version": onnxruntime.__version__, "available": list(onnxruntime.get_available_providers())}


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
def backends(as_json: bool) -> None:
    """List runtime backends, onnxruntime execution providers and forgetting solvers."""
    from forgetpack.engine.solvers import available_solvers
    from runtime.backends import discover

    listing = {
        "runtime_backends": {name: ep.value for name, ep in sorted(discover().items())},
        "onnxruntime": _providers(),
        "solvers": {name: ep.value for name, ep in sorted(available_solvers().items())},
    }
    if as_json:
        print_json(listing)
        return
    table = Table(title="forgetpack backends")
    table.add_column("kind", style="bold")
    table.add_column("name")
    table.add_column("provided by", overflow="fold")
    for name, value in listing["runtime_backends"].items():
        table.add_row("runtime backend", name, value)
    ort = listing["onnxruntime"]
    for name in ort["available"]:
        table.add_row("onnxruntime provider", name, f"onnxruntime {ort['version']}")
    if not ort["installed"]:
        table.add_row("onnxruntime provider", "-", "onnxruntime is not installed (pip install 'forgetpack[onnx]')")
    for name, value in listing["solvers"].items():
        table.add_row("solver", name, value)
    show(table)
