"""``python -m tfcompat_ema``: the ``tfcompat-ema`` command."""
import sys

from .cli import main

sys.exit(main())
