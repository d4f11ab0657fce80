import sys

from pacl_ray.world.build import main

sys.exit(main())
