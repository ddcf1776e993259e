"""`python -m minipeft` is the `minipeft` command."""

from .tools.cli import main

raise SystemExit(main())
