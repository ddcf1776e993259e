"""`python -m minipeft` is the `minipeft` command."""

from .cli import main

raise SystemExit(main())
