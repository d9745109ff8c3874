"""Entry point for ``python -m core``."""

from core.cli import main

raise SystemExit(main())
