"""`python -m tca_attention.eval ...`: the `tca eval` command without the top-level CLI."""
from .cli import main

raise SystemExit(main())
