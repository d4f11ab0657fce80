from pacl_ray.cli import main

raise SystemExit(main())
