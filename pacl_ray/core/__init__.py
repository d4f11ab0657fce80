"""Pure math and models: no Ray, no config, no storage.

The PACL loss (:mod:`.loss`), the partition codes and score calibration (:mod:`.partitions`),
k-means (:mod:`.kmeans`), the one module that calls ``torch.distributed`` (:mod:`.dist`), downstream
metrics (:mod:`.metrics`), post-text cleaning (:mod:`.text`), backbone/text-encoder factories
(:mod:`.backbones`) and the PACL model with its projection heads (:mod:`.pacl_model`).
"""
