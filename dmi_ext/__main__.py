"""``python -m dmi_ext``: the noisy-label toolkit's command line (``dmi_ext.toolkit.cli``)."""

import sys

from .toolkit.cli import main

sys.exit(main())
