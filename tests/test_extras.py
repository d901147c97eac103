"""The optional installs (extras): a command whose extra is missing says which one in one line, and each
extra installs what its commands import, no less and no more.

An install of only some extras is simulated in a subprocess whose path finder does not see the top-level
modules of the installed distributions that ``pip install 'forgetpack[EXTRA,...]'`` would not bring
(pyproject.toml's extras followed through the installed distributions by tools/extras_size.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from forgetpack.cli import main
from forgetpack.cli.extras import COMMAND_EXTRA, EXTRA_MODULES

main_module = importlib.import_module("forgetpack.cli.main")  # `forgetpack.cli.main` is also the function

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("extras_size", REPO / "tools" / "extras_size.py")
extras_size = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(extras_size)

CORE, EXTRAS = extras_size.read_extras(REPO / "pyproject.toml")

# Runs the CLI (argv[1:]) as the `forgetpack` script does. With $FORGETPACK_TEST_HIDE (a JSON file listing
# top-level modules) the standard path finder does not see those modules: to the import system and to
# importlib.util.find_spec they are not installed. With $FORGETPACK_TEST_MODULES it writes there the
# top-level modules the run imported and whether the runtime's tokenizer cleaned text with ftfy.
SCRIPT = """
import importlib.machinery, json, os, sys

before = set(sys.modules)
if os.environ.get("FORGETPACK_TEST_HIDE"):
    with open(os.environ["FORGETPACK_TEST_HIDE"]) as f:
        hidden = frozenset(json.load(f))

    class HidingPathFinder(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.partition(".")[0] in hidden:
                return None
            return super().find_spec(name, path, target)

    sys.meta_path[:] = [HidingPathFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]

from forgetpack.cli import main

try:
    code = main(sys.argv[1:])
finally:
    if os.environ.get("FORGETPACK_TEST_MODULES"):
        tokenizer = sys.modules.get("runtime.tokenizer")
        with open(os.environ["FORGETPACK_TEST_MODULES"], "w") as f:
            json.dump({"modules": sorted({m.partition(".")[0] for m in set(sys.modules) - before}),
                       "exact_cleaning": getattr(tokenizer, "EXACT_CLEANING", None)}, f)
sys.exit(code)
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "FORGETPACK_CACHE": str(tmp_path / "cache"), **extra}


def closure(*extras: str) -> set[str]:
    """The distributions (canonical names) ``pip install 'forgetpack[EXTRAS]'`` installs, core included."""
    found, _ = extras_size.closure(CORE + [f"forgetpack[{e}]" for e in extras], EXTRAS)
    return set(found)


def direct(extra: str) -> set[str]:
    """The distributions an extra names itself or through the extras it includes (not forgetpack)."""
    names: set[str] = set()
    for text in EXTRAS[extra]:
        req = Requirement(text)
        if canonicalize_name(req.name) == "forgetpack":
            for included in req.extras:
                names |= direct(included)
        else:
            names.add(canonicalize_name(req.name))
    return names


def modules_missing_without(*extras: str) -> list[str]:
    """Top-level modules of the installed distributions that ``forgetpack[EXTRAS]`` does not install."""
    wanted = closure(*extras)
    return sorted(module for module, dists in metadata.packages_distributions().items()
                  if not {canonicalize_name(d) for d in dists} & wanted and module not in ("forgetpack", "runtime"))


def hide_file(tmp_path: Path, *installed: str) -> Path:
    path = tmp_path / "hidden.json"
    path.write_text(json.dumps(modules_missing_without(*installed)))
    return path


def run_without(tmp_path: Path, installed: tuple[str, ...], *argvs: list[str]) -> list[dict]:
    """Each ``argv`` in a process of its own, as if only ``forgetpack[INSTALLED]`` were installed."""
    hide = hide_file(tmp_path, *installed)
    results = []
    for argv in argvs:
        done = subprocess.run([sys.executable, "-c", SCRIPT, *argv], capture_output=True, text=True, cwd=tmp_path,
                              env=_env(tmp_path, FORGETPACK_TEST_HIDE=str(hide)), timeout=300)
        results.append({"argv": argv, "code": done.returncode, "stdout": done.stdout, "stderr": done.stderr})
    return results


def assert_says_extra(result: dict, extra: str) -> None:
    """Exit status 1 and one line on stderr (a progress bar may leave a blank one) naming the extra."""
    command = result["argv"][0]
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert result["code"] == 1, result
    assert lines == [f"error: forgetpack {command} needs the {extra} extra: pip install 'forgetpack[{extra}]'"], result


@pytest.fixture
def images(tmp_path: Path) -> Path:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32), "white").save(folder / "white.png")
    return folder


# ------------------------------------------------------------------------- item 2: the one-line message


def test_with_no_extra_help_lists_every_command_and_each_names_its_extra(tmp_path: Path, images: Path) -> None:
    from patch_factory import make_patch, write_base

    image = str(images / "white.png")
    patch = make_patch(write_base(tmp_path / "base.safetensors"), 1).save(tmp_path / "p.fpatch")
    results = run_without(
        tmp_path, (),
        ["--help"],
        ["inspect", str(patch)],
        ["forget", "mini", "--forget", "seven", "-o", "seven.fpatch"],
        ["export", "mini", "-o", "export"],
        ["classify", str(images), image, "--labels", "cat,dog"],  # a directory: the torch-free runtime
        ["serve", str(images)],
        ["search", "index", "a cat"],
        ["backends"],  # imports the runtime package, which needs pillow
    )
    listing, inspect, *failing = results
    assert listing["code"] == 0, listing
    assert all(f"  {name} " in listing["stdout"] for name in main_module.COMMANDS), listing["stdout"]
    assert inspect["code"] == 0, inspect
    for result, extra in zip(failing, ["torch", "export", "onnx", "serve", "index", "onnx"], strict=True):
        assert_says_extra(result, extra)


def test_with_only_serve_installed_each_command_names_its_extra(tmp_path: Path, images: Path) -> None:
    """The issue's case: `pip install 'forgetpack[serve]'`, then `forgetpack forget mini` printed a 30-line traceback."""
    image = str(images / "white.png")
    cases = {
        ("forget", "mini", "--forget", "seven", "-o", "seven.fpatch"): "torch",
        ("eval", "mini", "--dataset", "digits"): "torch",
        ("benchmark", "paper", "--model", "mini"): "torch",
        ("export", "mini", "-o", "export"): "export",
        ("classify", "mini", image, "--labels", "cat,dog"): "torch",  # a model spec runs on torch
        ("index", str(images), "--model", "mini", "-o", "index"): "torch",
        ("rescore", "index", "--labels", "cat,dog"): "index",
        ("search", "index", "a cat"): "index",
    }
    results = run_without(tmp_path, ("serve",), *map(list, cases))
    for result, extra in zip(results, cases.values(), strict=True):
        assert_says_extra(result, extra)


@pytest.mark.slow
def test_with_only_serve_installed_compose_and_audit_name_torch(tmp_path_factory, tmp_path: Path) -> None:
    from serve_helpers import forget_patches

    patches = forget_patches(tmp_path_factory)
    seven = str(patches["seven"])
    results = run_without(
        tmp_path, ("serve",),
        ["compose", "mini", seven, str(patches["three"]), "-o", "both.fpatch"],
        ["audit", "mini", "--patch", seven, "--forget", "seven"],
    )
    for result in results:
        assert_says_extra(result, "torch")


@pytest.mark.slow
def test_with_only_torch_installed_the_runtime_commands_name_theirs(tmp_path_factory, tmp_path: Path, images: Path) -> None:
    from serve_helpers import serve_export

    export = str(serve_export(tmp_path_factory))
    cases = {
        ("classify", export, str(images / "white.png"), "--labels", "cat,dog"): "onnx",
        ("index", str(images), "--model", export, "-o", "index"): "index",
        ("serve", export): "serve",
        ("export", "mini", "-o", "export"): "export",  # the onnx package and onnxscript are not in [torch]
    }
    results = run_without(tmp_path, ("torch",), *map(list, cases))
    for result, extra in zip(results, cases.values(), strict=True):
        assert_says_extra(result, extra)


def _command_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(source, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_a_command_whose_module_needs_a_missing_extra_is_listed_and_says_which(tmp_path, monkeypatch, capsys) -> None:
    _command_module(tmp_path, monkeypatch, "fp_test_needs_lancedb",
                    "raise ModuleNotFoundError(\"No module named 'lancedb'\", name='lancedb')\n")
    monkeypatch.setitem(main_module.COMMANDS, "search", "fp_test_needs_lancedb:search")
    assert main(["--help"]) == 0
    assert "(needs the index extra)" in capsys.readouterr().out
    assert main(["search", "INDEX", "a cat", "--help"]) == 1
    assert capsys.readouterr().err == "error: forgetpack search needs the index extra: pip install 'forgetpack[index]'\n"


def test_a_missing_module_no_extra_provides_is_still_a_bug(tmp_path, monkeypatch) -> None:
    _command_module(tmp_path, monkeypatch, "fp_test_bug", (
        "import click\n\n"
        "@click.command()\n@click.argument('module')\n"
        "def bug(module):\n    __import__(module)\n"))
    monkeypatch.setitem(main_module.COMMANDS, "bug", "fp_test_bug:bug")
    for module in ("fp_no_such_module", "PIL.fp_no_such_module"):  # unknown, or a submodule of an installed extra
        with pytest.raises(ModuleNotFoundError):
            main(["bug", module])


# ------------------------------------------------------------------------- item 3: what each extra installs


def test_each_extra_provides_the_modules_the_cli_maps_to_it() -> None:
    assert set(COMMAND_EXTRA) == set(main_module.COMMANDS)
    assert set(EXTRA_MODULES) == set(EXTRAS) - {"all", "test"}
    assert {e for e in COMMAND_EXTRA.values() if e} <= set(EXTRA_MODULES)
    assert Requirement(EXTRAS["all"][0]).extras == set(EXTRA_MODULES)
    assert "forgetpack[all]" in EXTRAS["test"]
    providers = metadata.packages_distributions()
    for extra, modules in EXTRA_MODULES.items():
        installs = closure(extra)
        wrong = [m for m in modules if not {canonicalize_name(d) for d in providers.get(m, ())} & installs]
        assert not wrong, f"[{extra}] does not install {wrong}"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert all(f"| `[{extra}]` |" in readme for extra in EXTRA_MODULES)


def assert_extra_is_what_was_imported(extra: str, report_file: Path) -> None:
    """The run had only the extra installed; it imported every distribution the extra names, and the
    runtime cleaned text exactly (with ftfy), not with the fallback. (A namespace package such as
    ``opentelemetry`` comes from several distributions: the extra's are the ones that count.)"""
    report, installs, providers = json.loads(report_file.read_text()), closure(extra), metadata.packages_distributions()
    imported: set[str] = set()
    for module in report["modules"]:
        dists = {canonicalize_name(d) for d in providers.get(module, ())} - {"forgetpack"}
        assert not dists or dists & installs, f"{module} (from {sorted(dists)}) imported but not installed by [{extra}]"
        imported |= dists & installs
    assert not direct(extra) - imported, f"installed by [{extra}] but never imported: {sorted(direct(extra) - imported)}"
    assert report["exact_cleaning"] is True, f"[{extra}]: text cleaning fell back to the subset of ftfy"


@pytest.mark.slow
def test_classify_on_an_export_needs_exactly_the_onnx_extra(tmp_path_factory, tmp_path: Path, images: Path) -> None:
    from serve_helpers import serve_export

    export = serve_export(tmp_path_factory)
    out = tmp_path / "modules.json"
    env = _env(tmp_path, FORGETPACK_TEST_MODULES=str(out), FORGETPACK_TEST_HIDE=str(hide_file(tmp_path, "onnx")))
    done = subprocess.run([sys.executable, "-c", SCRIPT, "classify", str(export), str(images / "white.png"), "--labels",
                           "cat,dog"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_extra_is_what_was_imported("onnx", out)


@pytest.mark.slow
def test_serve_needs_exactly_the_serve_extra(tmp_path_factory, tmp_path: Path, images: Path) -> None:
    """A real `forgetpack serve` with only [serve] installed: a multipart classify request, a metrics scrape, Ctrl-C."""
    import httpx
    from serve_helpers import free_port, serve_export

    export = serve_export(tmp_path_factory)
    out, port = tmp_path / "modules.json", free_port()
    env = _env(tmp_path, FORGETPACK_TEST_MODULES=str(out), FORGETPACK_TEST_HIDE=str(hide_file(tmp_path, "serve")))
    server = subprocess.Popen([sys.executable, "-c", SCRIPT, "serve", str(export), "--port", str(port), "--threads", "1"],
                              cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        image = (images / "white.png").read_bytes()
        answer = httpx.post(f"{url}/v1/classify", files=[("images", ("white.png", image, "image/png"))],
                            data={"labels": ["cat", "dog"]}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 200
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
    assert_extra_is_what_was_imported("serve", out)
