"""``python -m pacl_ray.tune``: the main job (the sweep driver, :mod:`pacl_ray.sweeps.driver`)."""

import sys

from pacl_ray.sweeps.driver import main

if __name__ == "__main__":
    sys.exit(main())
