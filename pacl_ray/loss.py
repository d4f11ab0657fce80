"""The SPEC's stable Python contract: ``pacl_ray.loss.pacl_masks`` and ``pacl_ray.loss.pacl_loss``.

The implementation lives in :mod:`pacl_ray.core.loss`; this module keeps the public path.
"""

from pacl_ray.core.loss import PACLLoss, clip_loss, pacl_loss, pacl_masks, phase_partitions

__all__ = ["PACLLoss", "clip_loss", "pacl_loss", "pacl_masks", "phase_partitions"]
