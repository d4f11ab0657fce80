"""``python -m pacl_ray.tune``: the main job, ``pacl-ray tune`` (flags: :mod:`pacl_ray.cli`; the sweep
driver: :mod:`pacl_ray.sweeps.driver`)."""

import sys

from pacl_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
