"""Downstream evaluation (paper 4.4, 4.5): dataset readers, backbone resolution, features, linear
probe, fine-tuning, zero-shot, and the Table 1 report."""
