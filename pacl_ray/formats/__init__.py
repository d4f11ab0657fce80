"""Data formats and storage, one owner per format: storage URIs (:mod:`.storage`), the stage
tables' schemas and readers (:mod:`.tables`), and the exported-backbone format (:mod:`.export`)."""
