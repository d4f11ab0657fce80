"""Non-finite features (issue 16, item 9): embed never writes them, the cluster stage names them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pacl_ray.formats import tables
from pacl_ray.stages import pseudo_labels
from pacl_ray.stages.embed import features_table


def _features(n=4, di=3, dt=2) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return [f"id{i}" for i in range(n)], rng.normal(size=(n, di)), rng.normal(size=(n, dt))


def test_embed_refuses_non_finite_features():
    ids, image, text = _features()
    assert features_table(ids, image, text).num_rows == 4
    image[1, 0] = np.nan
    with pytest.raises(ValueError, match=r"non-finite image_feature .*1 pair\(s\), ids \['id1'\]"):
        features_table(ids, image, text)
    ids, image, text = _features()
    text[2, 1] = 1e6  # finite in float32, inf in float16
    assert features_table(ids, image, text, "float32").num_rows == 4
    with pytest.raises(ValueError, match=r"non-finite text_feature .*float16.*ids \['id2'\]"):
        features_table(ids, image, text, "float16")


def test_cluster_names_ids_and_modality(tmp_path):
    """One NaN image row and one +inf text row -> an error naming the id and the modality."""
    ids, image, text = _features()
    image[1] = np.nan
    text[3, 0] = np.inf
    path = tmp_path / "features" / "part.parquet"
    path.parent.mkdir()
    schema = tables.features_schema(3, 2)

    def column(x):  # written directly: features_table itself refuses non-finite values
        return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1).astype(np.float32)), x.shape[1])

    pq.write_table(pa.Table.from_arrays([pa.array(ids), column(image), column(text)], schema=schema), path)
    part = pseudo_labels.ParquetSlice(((str(path), 4),), 0, 4)
    with pytest.raises(pseudo_labels.NonFiniteFeaturesError, match=r"image_feature \(factual\).*ids \['id1'\]"):
        pseudo_labels.ShardWorker(part)
    image[1] = 0.5
    pq.write_table(pa.Table.from_arrays([pa.array(ids), column(image), column(text)], schema=schema), path)
    with pytest.raises(pseudo_labels.NonFiniteFeaturesError, match=r"text_feature \(emotional\).*ids \['id3'\]"):
        pseudo_labels.ShardWorker(part)
    text[3, 0] = 0.1
    pq.write_table(pa.Table.from_arrays([pa.array(ids), column(image), column(text)], schema=schema), path)
    assert pseudo_labels.ShardWorker(part).num_rows() == 4
