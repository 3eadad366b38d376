"""``python -m airvae.cli``: the ``airvae`` command."""

import sys

from . import main

sys.exit(main())
