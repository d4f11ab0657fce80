"""``python -m pacl_ray.world``: ``pacl-ray world`` (the one parser lives in :mod:`pacl_ray.cli`; this
entry script is the only module under ``world`` that imports it, and nothing imports this one)."""

import sys

from pacl_ray.cli import main

sys.exit(main(["world", *sys.argv[1:]]))
