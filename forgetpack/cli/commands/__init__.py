"""CLI commands, one module per group; ``forgetpack.cli.main`` imports them only when called."""
