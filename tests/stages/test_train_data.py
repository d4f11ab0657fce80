"""Stage 3's data plan (pure): epoch order, rank slots, phases, steps and empty phases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from pacl_ray import config
from pacl_ray.config import partition_args
from pacl_ray.core.partitions import assign_partitions
from pacl_ray.stages.train_data import (
    NoTrainableEpochError, epoch_phases, epoch_positions, make_plan, objective_plan, rank_slots, steps_per_epoch,
)

CODES = [1] * 8 + [2] * 8 + [3] * 8 + [4] * 8  # 32 pairs; batch 8 -> 1 + 3 + 4 steps over 3 epochs
TABLE5_SIGMA = Path(__file__).resolve().parents[2] / "tune_spaces" / "table5_sigma.yaml"


def make_cfg(output_dir="unused", partition=None, **train) -> config.RunConfig:
    return config.from_dict({
        "output_dir": str(output_dir), "seed": 3, "partition": dict(partition or {}),
        "train": {"epochs": 3, "global_batch_size": 8, **train},
    })



def test_epoch_positions_are_a_seeded_permutation_of_the_phase():
    codes = np.array([1, 2, 3, 4] * 5)
    pos = epoch_positions(codes, (1, 2, 3), seed=0, epoch=1, global_batch=4)
    used = pos >= 0
    assert set(np.flatnonzero(used)) <= set(np.flatnonzero(codes != 4))
    assert sorted(pos[used]) == list(range(12))  # 15 phase rows -> 3 full batches of 4
    assert np.array_equal(pos, epoch_positions(codes, (1, 2, 3), seed=0, epoch=1, global_batch=4))
    assert not np.array_equal(pos, epoch_positions(codes, (1, 2, 3), seed=0, epoch=2, global_batch=4))


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_rank_slots_tile_the_global_batch(world):
    slots = [rank_slots(10, r, world) for r in range(world)]
    assert slots[0][0] == 0 and slots[-1][1] == 10
    assert all(a[1] == b[0] for a, b in zip(slots, slots[1:]))


def test_phases_and_steps():
    cfg = make_cfg()
    phases = epoch_phases(cfg)
    assert phases == [(1,), (1, 2, 3), (1, 2, 3, 4)]
    assert steps_per_epoch(np.array(CODES), phases, 8) == [1, 3, 4]
    clip = make_cfg(objective="clip")
    assert epoch_phases(clip) == [(1,)] * 3




def test_objective_plan_is_the_one_place_clip_differs():
    codes = np.array(CODES)
    pacl_codes, pacl_phases = objective_plan("pacl", "progressive", 3, codes)
    assert np.array_equal(pacl_codes, codes) and pacl_phases == [(1,), (1, 2, 3), (1, 2, 3, 4)]
    clip_codes, clip_phases = objective_plan("clip", "progressive", 3, codes)
    assert (clip_codes == 1).all() and clip_phases == [(1,)] * 3
    with pytest.raises(ValueError, match="train.objective must be one of pacl, clip, got 'simclr'"):
        objective_plan("simclr", "progressive", 3, codes)


def table5_codes(sigma: float, n: int = 32, seed: int = 0) -> np.ndarray:
    """Partition codes of a table5_sigma trial: CLIP-like raw cosines (0.1-0.4) thresholded at
    ``sigma`` on the default calibration, as the partition stage does."""
    rng = np.random.default_rng(seed)
    pcfg = make_cfg(partition={"sigma": sigma}).partition
    return assign_partitions(rng.uniform(0.1, 0.4, n), rng.uniform(0.1, 0.4, n), **partition_args(pcfg)).astype(np.int64)


def test_table5_sigma_grid_has_the_empty_phase_ends():
    grid = yaml.safe_load(TABLE5_SIGMA.read_text())["search"]["partition.sigma"]["grid"]
    assert {0, 0.9, 1} <= set(grid)


@pytest.mark.parametrize("sigma, steps", [(0, [4, 4, 4]), (0.9, [0, 0, 4]), (1, [0, 0, 4])])
def test_table5_sigma_plans_skip_empty_phases(sigma, steps):
    cfg = make_cfg(partition={"sigma": sigma})
    scored = table5_codes(sigma)
    codes, plan = make_plan(cfg, scored)
    assert np.array_equal(codes, scored)
    assert plan.steps == steps and plan.total_steps == sum(steps)
    assert plan.skipped() == [e for e, n in enumerate(steps) if n == 0]
    assert plan.counts == {k: int((scored == k).sum()) for k in (1, 2, 3, 4)}
    for epoch in plan.skipped():
        note = plan.skip_note(epoch)
        assert f"holds {plan.pairs[epoch]} pairs, fewer than one global batch of 8: no step" in note
        assert f"4 weak-coupled: {plan.counts[4]}" in note


def test_sigma_one_codes_are_all_weak_coupled():
    assert (table5_codes(1) == 4).all() and (table5_codes(0) == 1).all()


def test_a_run_with_no_step_names_sigma_calibration_and_counts():
    cfg = make_cfg(partition={"sigma": 1, "factual_calibration": "rank"}, global_batch_size=64)
    with pytest.raises(NoTrainableEpochError) as err:
        make_plan(cfg, np.full(32, 4))
    message = str(err.value)
    for part in ("partition.sigma=1", "factual 1.0 on the rank calibration", "emotional 1.0 on the clipscore calibration",
                 "1 strong-coupled: 0", "4 weak-coupled: 32", "global batch of 64"):
        assert part in message, part


def test_clip_objective_trains_every_pair_every_epoch():
    codes, plan = make_plan(make_cfg(objective="clip"), np.full(32, 4))
    assert (codes == 1).all() and plan.steps == [4, 4, 4] and plan.counts[4] == 32


# --------------------------------------------------------------------------- sample usage (SPEC Choice, paper Table 4)


@pytest.mark.parametrize("partitions, phases, steps", [
    ([1, 2, 3, 4], [(1,), (1, 2, 3), (1, 2, 3, 4)], [1, 3, 4]),
    ([1], [(1,), (1,), (1,)], [1, 1, 1]),
    ([1, 2], [(1,), (1, 2), (1, 2)], [1, 2, 2]),
    ([1, 2, 3], [(1,), (1, 2, 3), (1, 2, 3)], [1, 3, 3]),
    ([2, 4], [(), (2,), (2, 4)], [0, 1, 2]),
])
def test_each_phase_gets_its_intersection_with_train_partitions(partitions, phases, steps):
    cfg = make_cfg(partitions=partitions)
    assert epoch_phases(cfg) == phases
    codes, plan = make_plan(cfg, np.array(CODES))
    assert np.array_equal(codes, CODES) and plan.phases == phases and plan.steps == steps
    for epoch in plan.skipped():
        assert plan.skip_note(epoch).startswith("phase (none of train.partitions) holds 0 pairs")


def test_partitions_that_leave_no_step_name_the_key():
    with pytest.raises(NoTrainableEpochError, match=r"train.partitions=\[4\]"):
        make_plan(make_cfg(partitions=[4]), np.array([1, 2, 3] * 8))
    with pytest.raises(ValueError, match="train.partitions must be a non-empty subset"):
        objective_plan("pacl", "progressive", 3, np.array(CODES), [5])


TABLE4 = Path(__file__).resolve().parents[2] / "tune_spaces" / "table4.yaml"


def test_table4_rows_train_on_the_papers_samples():
    """Every row of tune_spaces/table4.yaml, from scores to the pairs each epoch trains on: the
    factual (emotional) partition's matched pairs are strong-coupled and its mismatched pairs
    partial-coupled (paper Table 4 caption); sample usage picks which of them are ever used."""
    rng = np.random.default_rng(0)
    factual, emotional = rng.uniform(0.1, 0.4, 400), rng.uniform(0.1, 0.4, 400)
    rows = yaml.safe_load(TABLE4.read_text())["rows"]
    seen = {}
    for row in rows:
        cfg = config.from_dict(config.layer_config({"train.epochs": 3, "train.global_batch_size": 8}, row["set"]))
        scored = assign_partitions(factual, emotional, **partition_args(cfg.partition)).astype(np.int64)
        f_matched = 2.5 * factual > 0.7
        e_matched = 2.5 * emotional > 0.7
        codes, plan = make_plan(cfg, scored)
        trained = set().union(*[set(np.flatnonzero(np.isin(codes, phase))) for phase in plan.phases])
        seen[row["name"]] = trained
        if cfg.partition.use_scores == "factual":
            assert np.array_equal(scored == 1, f_matched) and set(np.unique(scored)) == {1, 2}
        if cfg.partition.use_scores == "emotional":
            assert np.array_equal(scored == 1, e_matched) and set(np.unique(scored)) == {1, 3}
    everything = set(range(400))
    assert seen["None: All"] == everything
    assert seen["Factual: Factual-matched"] == set(np.flatnonzero(2.5 * factual > 0.7))
    assert seen["Factual: Factual-matched + Factual-mismatched"] == everything
    assert seen["Emotional: Emotional-matched"] == set(np.flatnonzero(2.5 * emotional > 0.7))
    assert seen["Emotional: Emotional-matched + Emotional-mismatched"] == everything
    strong = set(np.flatnonzero((2.5 * factual > 0.7) & (2.5 * emotional > 0.7)))
    weak = set(np.flatnonzero((2.5 * factual <= 0.7) & (2.5 * emotional <= 0.7)))
    assert seen["Both: Strong-coupled"] == strong
    assert seen["Both: Strong-coupled + Partial-coupled"] == everything - weak
    assert seen["Both: Strong-coupled + Partial-coupled + Weak-coupled"] == everything


def test_training_decodes_large_jpegs_at_reduced_scale_never_below_the_crop(monkeypatch):
    """_decode_batch asks the decoder for the shorter side the random-resized crop needs (366 px
    for 224 px at crop scale >= 0.5): a 1600x1200 JPEG decodes at 1/2, every crop still >= 224 px."""
    import io

    import pyarrow as pa
    from PIL import Image

    from pacl_ray.core.pacl_model import train_transform
    from pacl_ray.formats import images
    from pacl_ray.stages.train_data import _decode_batch

    buffer = io.BytesIO()
    Image.new("RGB", (1600, 1200), (90, 120, 150)).save(buffer, "JPEG")
    seen = []
    real = images.decode_rgb

    def spy(data, max_pixels=None, min_side=None):
        image = real(data, max_pixels, min_side)
        seen.append((min_side, image.size))
        return image

    monkeypatch.setattr(images, "decode_rgb", spy)
    transform = train_transform(224, crop_scale=(0.5, 1.0))
    batch = pa.table({"row": [0, 1], "image": [buffer.getvalue()] * 2, "text_feature": pa.array(
        [[0.0, 1.0]] * 2, pa.list_(pa.float32(), 2)), "partition": [1, 1], "factual_pseudo_label": [0, 0],
        "emotional_pseudo_label": [0, 0], "position": [0, 1]})
    out = _decode_batch(batch, transform, seed=0, epoch=0)
    assert out["image"].shape == (2, 3, 224, 224)
    assert out["image"].dtype == np.uint8  # normalised on the training device (train_step.ImageNormalizer)
    assert seen == [(366, (800, 600))] * 2
