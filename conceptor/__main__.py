"""``python -m conceptor`` (what ``accelerate launch -m conceptor ...`` runs)."""
import sys

from .cli import main

sys.exit(main())
