"""``python -m fastgen``: see :mod:`fastgen.cli`."""

from fastgen.cli import main

raise SystemExit(main())
