"""The ``forgetpack`` command line.

Subcommands live in ``forgetpack.cli.commands.*`` and are imported only when used, so
``forgetpack --help``, ``inspect`` and ``verify`` never pay for torch. A command module
must therefore keep heavy imports (torch, open_clip, onnx) inside its functions.

Any ``ForgetpackError`` becomes one line on stderr and exit status 1: no traceback. So does a
``ModuleNotFoundError`` for a module an optional install provides: the line names the extra to
install (``cli.extras``); a command whose extra is missing is still listed and callable. Warnings
the library logs are shown as ``warning: ...`` lines (``render.library_warnings``).
"""

from __future__ import annotations

import importlib
import sys

import click

from forgetpack import __version__
from forgetpack.cli.extras import MissingExtra, missing_extra
from forgetpack.cli.render import echo, library_warnings
from forgetpack.format.errors import ForgetpackError

# name -> "module:attribute"; the order here is the order of ``--help``.
COMMANDS: dict[str, str] = {
    "forget": "forgetpack.cli.commands.forget:forget",
    "compose": "forgetpack.cli.commands.forget:compose",
    "eval": "forgetpack.cli.commands.evaluate:evaluate",
    "audit": "forgetpack.cli.commands.audit:audit",
    "benchmark": "forgetpack.cli.commands.benchmark:benchmark",
    "inspect": "forgetpack.cli.commands.patch:inspect",
    "verify": "forgetpack.cli.commands.patch:verify",
    "apply": "forgetpack.cli.commands.patch:apply",
    "revert": "forgetpack.cli.commands.patch:revert",
    "stack": "forgetpack.cli.commands.patch:stack",
    "keygen": "forgetpack.cli.commands.patch:keygen",
    "sign": "forgetpack.cli.commands.patch:sign",
    "export": "forgetpack.cli.commands.export:export",
    "classify": "forgetpack.cli.commands.classify:classify",
    "backends": "forgetpack.cli.commands.backends:backends",
    "serve": "forgetpack.cli.commands.serve:serve",
    "index": "forgetpack.cli.commands.index:index",
    "rescore": "forgetpack.cli.commands.index:rescore",
    "search": "forgetpack.cli.commands.index:search",
}


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module only when it is needed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._load(name) is not None]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self._load(cmd_name)

    def invoke(self, ctx: click.Context) -> object:
        """Run the subcommand; a module it needs from a missing extra becomes ``MissingExtra``."""
        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as exc:
            error = missing_extra(ctx.invoked_subcommand, exc)
            if error is None:
                raise  # not an optional install: a bug, with its traceback
            raise error from None

    @staticmethod
    def _load(name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # A command whose module is not part of this install is simply absent.
            if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                return None
            # One whose module imports a missing extra is listed, and says which extra when run.
            error = missing_extra(name, exc)
            if error is None:
                raise
            return _needs_extra(name, error)
        return getattr(module, attr)


def _needs_extra(name: str, error: MissingExtra) -> click.Command:
    """A stand-in for command ``name`` that takes any arguments and raises ``error``."""

    def fail(args: tuple[str, ...]) -> None:
        raise error

    return click.Command(name, callback=fail, help=str(error), short_help=f"(needs the {error.extra} extra)",
                         params=[click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)],
                         context_settings={"ignore_unknown_options": True, "help_option_names": []})


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="forgetpack")
def cli() -> None:
    """Make CLIP models forget classes; ship the change as a small, verifiable patch."""


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the CLI, turning user errors into one line and exit 1."""
    try:
        with library_warnings():
            cli.main(args=argv, prog_name="forgetpack", standalone_mode=False)
    except ForgetpackError as exc:
        echo(f"error: {exc}", err=True)
        return 1
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except OSError as exc:  # an input or output the library met without a word of its own (a full disk)
        where = f"{exc.filename}: " if exc.filename else ""
        echo(f"error: {where}{exc.strerror or exc}", err=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
