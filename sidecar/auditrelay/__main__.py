"""``python -m auditrelay`` is the ``auditrelay`` command."""

import sys

from auditrelay.cli import main

sys.exit(main())
