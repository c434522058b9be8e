"""``python -m spinquant_client``: the same CLI as ``spinquant``."""

from .cli import main

raise SystemExit(main())
