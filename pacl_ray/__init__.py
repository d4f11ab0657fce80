"""pacl_ray: Partitioned Adaptive Contrastive Learning (ACM MM 2024) on Ray.

Pre-trained visual backbones learn to perceive emotion from noisy social-media image-text pairs
by borrowing a frozen text model's knowledge. See README.md and SPEC.md for the method contract.
"""

__version__ = "0.1.0"
