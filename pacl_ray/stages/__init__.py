"""The pipeline's stages, each a Ray job that writes Parquet the next one reads: the content-keyed
stage cache (:mod:`.cache`), Ray start-up (:mod:`.runtime`), the pipeline that resolves each stage once
(:mod:`.pipeline`), then ingest, scoring + partition (paper 3.1), embed and pseudo-labels (3.2) and
training (3.3)."""
