"""``python -m forgetpack.cli``: the same as the ``forgetpack`` command."""

import sys

from forgetpack.cli.main import main

sys.exit(main())
