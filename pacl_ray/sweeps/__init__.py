"""Ray Tune sweeps over cached stage outputs (paper 5.2): search spaces and the sweep driver with its
Table 5 report."""
