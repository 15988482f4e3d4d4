"""``python -m scope_streamdiffusion`` = the ``scope-streamdiffusion`` command."""

import sys

from .cli import main

sys.exit(main())
