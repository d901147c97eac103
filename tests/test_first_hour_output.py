"""Issue 23, items 6, 9 and 10: an int8 export reports its own numbers; output piped to a file never
wraps, and long steps show progress; a patched or applied mini checkpoint loads like any ARCH:PATH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from forgetpack.cli import main
from forgetpack.format.patch import read_patch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
MINI_WEIGHTS = ROOT / "forgetpack" / "mini" / "mini.safetensors"


def run(args: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------- 6. honest int8 numbers


def test_an_int8_export_reports_its_own_parity_and_accuracy(tmp_path, capsys) -> None:
    out_dir = tmp_path / "int8"
    code, out, err = run(["export", "mini", "--quantize", "int8", "-o", out_dir], capsys)
    assert code == 0, err
    checks = json.loads((out_dir / "manifest.json").read_text())["export_check"]
    for tower in ("image", "text"):
        assert checks[f"{tower}.fp32"] <= 1e-4  # the fp32 graph, before quantization
        assert checks[tower] > 10 * checks[f"{tower}.fp32"]  # the int8 graph's own difference is not the fp32 one
        assert f"max |onnx - torch| {checks[tower]:.1e} (int8; fp32 graph {checks[f'{tower}.fp32']:.1e})" in out
    line = next(line for line in out.splitlines() if line.startswith("accuracy"))
    assert "digits held-out top-1" in line and "int8" in line and "fp32" in line and "(500 images)" in line
    int8, fp32 = (float(w.rstrip("%,")) / 100 for w in line.split() if w.endswith("%") or w.endswith("%,"))
    assert fp32 > 0.95 and abs(int8 - fp32) <= 0.02


def test_the_accuracy_check_measures_the_patched_model(tmp_path, seven) -> None:
    from forgetpack.engine.models import load_model
    from forgetpack.evaluation.quantization import quantized_accuracy
    from forgetpack.export import export_loaded

    loaded = load_model("mini")
    patch = read_patch(seven)
    export_loaded(loaded, tmp_path / "int8", [patch], quantize="int8")
    check = quantized_accuracy(loaded, tmp_path / "int8", [patch])
    assert check is not None and check.dataset == "digits"
    assert 0.85 < check.fp32 < 0.92  # the sevens are gone on both sides, so ~90%
    assert abs(check.int8 - check.fp32) <= 0.02


# ---------------------------------------------------------------------------- 9. output


def test_tables_piped_to_a_program_never_wrap() -> None:
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    result = subprocess.run([sys.executable, "-m", "forgetpack.cli", "backends"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "runtime.backends.onnx:OnnxBackend" in result.stdout  # whole, not "runtime.backends.onnx:OnnxBa" / "ckend"


def test_a_long_title_is_not_folded_mid_word() -> None:
    from forgetpack.cli.render import Table, console

    table = Table(title="forgetpack-mini:/a/rather/long/path/to/a/patched/checkpoint.safetensors")
    table.add_column("x")
    table.add_row("1")
    out = console()
    with out.capture() as captured:
        out.print(table)
    assert "checkpoint.safetensors" in captured.get()


def test_the_progress_bar_names_each_step_until_counts_arrive() -> None:
    from rich.console import Console
    from rich.progress import Progress, TextColumn

    from forgetpack.cli.render import Bar

    with Progress(TextColumn("{task.description} {task.completed}/{task.total}"),
                  console=Console(file=open(os.devnull, "w")), auto_refresh=False) as progress:  # noqa: SIM115
        bar = Bar(progress, "encoding text")
        task = progress.tasks[0]
        bar.step("loading mini")
        assert task.description == "loading mini" and task.total is None
        bar(3, 10)
        assert task.description == "encoding text" and (task.completed, task.total) == (3, 10)
        bar.step("reading the datasets", counting="encoding images")
        bar(1, 2)
        assert task.description == "encoding images"


def test_a_model_load_is_announced_before_it_starts(monkeypatch, tmp_path) -> None:
    from forgetpack.engine import weights

    monkeypatch.setenv("FORGETPACK_CACHE", str(tmp_path / "empty-cache"))  # cold: the model must load
    heard: list[str] = []
    assert weights.run_with_model("mini", lambda loaded: loaded.model_id, loading=heard.append) == "mini"
    assert heard == ["loading mini"]


def test_eval_reports_progress_over_every_image(seven) -> None:
    from forgetpack.evaluation.harness import evaluate

    heard: list[tuple[int, int]] = []
    evaluate("mini", patches=[seven], datasets=["digits"], progress=lambda done, total: heard.append((done, total)))
    assert heard[-1] == (1000, 1000)  # 500 held-out digits, before and after the patch
    assert [d for d, _ in heard] == sorted(d for d, _ in heard) and len(heard) >= 2


def test_export_reports_each_step(tmp_path) -> None:
    from forgetpack.engine.models import load_model
    from forgetpack.export import export_loaded

    lines: list[str] = []
    export_loaded(load_model("mini"), tmp_path / "e", quantize="int8", progress=lines.append)
    assert [line.split(" the ")[0] for line in lines[:4]] == ["exporting", "quantizing", "exporting", "quantizing"]


# ---------------------------------------------------------------------------- 10. a patched checkpoint is a model


@pytest.mark.parametrize("arch", ["mini", "forgetpack-mini"])
def test_an_applied_mini_checkpoint_loads_like_any_arch_path(tmp_path, capsys, seven, arch) -> None:
    from forgetpack.engine.models import load_model

    applied = tmp_path / "mini-no-seven.safetensors"
    code, _, err = run(["apply", MINI_WEIGHTS, seven, "-o", applied], capsys)
    assert code == 0, err
    loaded = load_model(f"{arch}:{applied}")
    assert loaded.model_id == f"forgetpack-mini:{applied.resolve()}" and loaded.vocabulary  # mini's classes too
    from forgetpack.engine.torch_patch import apply_patches, read_matrices

    base = load_model("mini")
    patch = read_patch(seven)
    (target,) = patch.targets
    before = read_matrices(base.model, [target])[target]
    apply_patches(base.model, [patch], name="mini")
    got = read_matrices(loaded.model, [target])[target]
    assert not np.array_equal(got, before) and np.array_equal(got, read_matrices(base.model, [target])[target])
    code, out, err = run(["classify", f"{arch}:{applied}", ROOT / "docs" / "serve-page.png", "--labels", "seven,eight"], capsys)
    assert code == 0, err


def test_a_foreign_file_as_mini_weights_is_one_line(tmp_path, capsys, seven) -> None:
    code, out, err = run(["classify", f"mini:{seven}", ROOT / "docs" / "serve-page.png", "--labels", "a,b"], capsys)
    assert code == 1 and err.count("\n") == 1 and "does not fit forgetpack-mini" in err, err
