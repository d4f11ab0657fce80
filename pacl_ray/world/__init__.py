"""The embedded affective world: a deterministic synthetic dataset with fitted stand-in models that
the default run uses when no data is given (:mod:`.build`), and small synthetic stage tables for
tests and benchmarks (:mod:`.stage_tables`). ``python -m pacl_ray.world`` builds it and prints its
report."""
