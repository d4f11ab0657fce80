"""The embedded world: deterministic data, planted split, layouts, stand-ins, cache, no colour cue."""

from __future__ import annotations

import hashlib
import os
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pacl_ray import config
from pacl_ray.core import backbones
from pacl_ray.world import build, data, standins


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory) -> build.World:
    return build.ensure_world(str(tmp_path_factory.mktemp("cache")), seed=0, size="tiny", progress=False)


def _data_hashes(root: Path) -> dict[str, str]:
    """sha256 of every data file (not the fitted checkpoints or the report)."""
    files = [root / "manifest.jsonl", root / "anp_vocab.txt", root / "clean" / "clean.jsonl"]
    files += sorted(root.glob("images/*.png")) + sorted(root.glob("clean/*.png"))
    files += sorted(root.glob("downstream/*/*/*.png"))
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_same_seed_gives_identical_files(tiny_world, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    again.mkdir(), other.mkdir()
    build.generate_data(again, 0, build.SIZES["tiny"])
    build.generate_data(other, 1, build.SIZES["tiny"])
    reference = _data_hashes(Path(tiny_world.root))
    assert len(reference) > 400
    assert _data_hashes(again) == reference
    assert _data_hashes(other) != reference


def test_world_key_depends_on_seed_and_size():
    assert build.world_key(0, "tiny") == build.world_key(0, "tiny")
    assert len({build.world_key(0, "tiny"), build.world_key(1, "tiny"), build.world_key(0, "default")}) == 3


def test_planted_split_matches_target(tiny_world):
    rows = data.read_jsonl(tiny_world.manifest)
    codes = np.array([r["planted_partition"] for r in rows])
    for code, target in data.PLANTED_SPLIT.items():
        assert abs(np.mean(codes == code) - target) <= 0.01
    assert tiny_world.report["planted_split_percent"] == {
        str(c): round(100 * float(np.mean(codes == c)), 2) for c in (1, 2, 3, 4)
    }


def _names_object(text: str, obj: str) -> bool:
    return any(re.search(rf"\b{re.escape(noun)}\b", text) for noun in data.OBJECTS[obj])


def test_captions_name_the_planted_object(tiny_world):
    for row in data.read_jsonl(tiny_world.manifest):
        factual_match = row["planted_partition"] in (1, 3)
        assert _names_object(row["text"], row["object"]) == factual_match, row


def test_captioned_sample_follows_the_code():
    rng = np.random.default_rng(0)
    truth = data.Sample("star", "sadness")
    for code, same_object, same_emotion in ((1, True, True), (2, False, True), (3, True, False), (4, False, False)):
        for _ in range(20):
            said = data.captioned_sample(rng, truth, code)
            assert (said.object == truth.object) == same_object
            assert (said.emotion == truth.emotion) == same_emotion


def test_manifest_and_imagefolder_layout(tiny_world):
    root = Path(tiny_world.root)
    rows = data.read_jsonl(tiny_world.manifest)
    assert len(rows) == build.SIZES["tiny"].train_pairs
    assert len({r["id"] for r in rows}) == len(rows)
    for row in rows[:20]:
        assert set(row) == {"id", "image", "text", "planted_partition", "object", "emotion"}
        with Image.open(Path(tiny_world.manifest).parent / row["image"]) as image:
            assert image.mode == "RGB" and image.size == (32, 32)
    total = 0
    for split in ("train", "val", "test"):
        folders = sorted(p.name for p in (root / "downstream" / split).iterdir())
        assert folders == sorted(tiny_world.emotions)
        total += len(list((root / "downstream" / split).glob("*/*.png")))
    assert total == build.SIZES["tiny"].downstream_images
    vocab = [line for line in Path(tiny_world.anp_vocab).read_text().splitlines() if not line.startswith("#")]
    assert len(vocab) == len(data.OBJECTS) * len(data.EMOTIONS) * 3


def test_stand_ins_load_through_models(tiny_world):
    bundle = backbones.create_clip(tiny_world.clip_model, tiny_world.clip_checkpoint)
    image = bundle.preprocess(Image.open(next(Path(tiny_world.downstream).glob("test/*/*.png"))))
    with torch.no_grad():
        image_features = bundle.model.encode_image(image[None], normalize=True)
        text_features = bundle.model.encode_text(bundle.tokenizer(["a happy star"]), normalize=True)
    assert image_features.shape == text_features.shape == (1, 64)

    backbone = backbones.create_backbone(
        tiny_world.backbone, "true", checkpoint=tiny_world.backbone_checkpoint,
        input_size=tiny_world.backbone_input_size,
    )
    assert backbone.image_size == 32
    pixels = backbone.eval_transform(Image.open(next(Path(tiny_world.downstream).glob("test/*/*.png"))))
    with torch.no_grad():
        assert backbone.model.eval()(pixels[None]).shape == (1, backbone.num_features)

    # the saved weights are the fitted ones, and timm's default 1000-way head loads too
    import timm
    from safetensors.torch import load_file

    saved = load_file(tiny_world.backbone_checkpoint)
    loaded = backbone.model.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in loaded.items())
    full = timm.create_model(
        tiny_world.backbone, pretrained=True, pretrained_cfg_overlay=dict(file=tiny_world.backbone_checkpoint)
    )
    assert torch.equal(full.state_dict()["fc.weight"], saved["fc.weight"])


def test_config_overrides_validate(tiny_world):
    cfg = config.from_dict(tiny_world.config_overrides())
    assert cfg.ingest.manifest == tiny_world.manifest
    assert cfg.partition.clip_pretrained == tiny_world.clip_checkpoint
    assert cfg.model.backbone_checkpoint == tiny_world.backbone_checkpoint
    assert cfg.model.text_encoder == backbones.MINILM_ID
    assert cfg.evaluate.tasks == [f"imagefolder:emotion={tiny_world.downstream}"]


def test_report_holds_the_gap(tiny_world):
    gap = tiny_world.report["gap_probe_accuracy"]
    for key in ("random_init", "object_pretrained", "ceiling"):
        assert 0.0 <= gap[key] <= 1.0
    saved = json.loads((Path(tiny_world.root) / "report.json").read_text())
    assert saved == tiny_world.report


def test_second_call_reuses_the_world(tiny_world, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the world was rebuilt")

    monkeypatch.setattr(build, "build_world", fail)
    again = build.ensure_world(str(Path(tiny_world.root).parent), seed=0, size="tiny", progress=False)
    assert again == tiny_world


def test_partial_world_is_rebuilt(tmp_path, monkeypatch):
    root = tmp_path / build.world_key(0, "tiny")
    root.mkdir()
    (root / "leftover.png").write_bytes(b"partial")
    built = []

    def fake_build(path, seed, size, progress=True):
        built.append(path)
        return {"timings_s": {}}

    monkeypatch.setattr(build, "build_world", fake_build)
    result = build.ensure_world(str(tmp_path), seed=0, size="tiny", progress=False)
    assert [p.name for p in built] == [f".{root.name}.building-{os.getpid()}"]  # staged, then renamed
    assert not (root / "leftover.png").exists()
    assert (root / build.SUCCESS).exists() and result.root == str(root)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
    assert build.default_cache_dir() == str(tmp_path / "world")


def test_emotion_is_not_a_global_colour_or_brightness_shift():
    """Per-image colour statistics (mean and spread of each channel) carry no emotion."""
    from scipy.stats import f_oneway
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    rng = np.random.default_rng(0)
    samples = data.random_samples(rng, 900, link=0.0)  # the texture alone, without the content link
    pixels = np.stack([np.asarray(data.render(rng, s), dtype=np.float32) for s in samples])  # [N, H, W, 3]
    stats = np.concatenate([pixels.mean((1, 2)), pixels.std((1, 2))], 1)  # [N, 6]
    labels = np.array([list(data.EMOTIONS).index(s.emotion) for s in samples])
    for column in stats.T:
        assert f_oneway(*[column[labels == k] for k in range(len(data.EMOTIONS))]).pvalue > 0.01
    accuracy = cross_val_score(LogisticRegression(max_iter=2000), stats, labels, cv=5).mean()
    assert accuracy < 1 / len(data.EMOTIONS) + 0.08


def test_unknown_size_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown world size"):
        build.ensure_world(str(tmp_path), size="huge")


def test_object_pretraining_keeps_the_stem_at_its_seeded_init(tiny_world):
    """The first stem convolutions stay generic (random) filters; the layers above do change."""
    import timm
    from safetensors.torch import load_file

    torch.manual_seed(0)  # tiny_world's seed: fit_backbone seeds timm's init with it
    init = timm.create_model(standins.BACKBONE, pretrained=False, num_classes=len(data.OBJECTS)).state_dict()
    fitted = load_file(str(Path(tiny_world.root) / "backbone.safetensors"))
    frozen = [k for k in init if k.startswith(standins.FROZEN_STEM) and init[k].is_floating_point() and "running" not in k]
    assert frozen, "FROZEN_STEM names no parameter of the backbone"
    for key in frozen:
        assert torch.equal(fitted[key], init[key]), key
    trained = [k for k in init if k.startswith("layer") and k.endswith("conv1.weight")]
    assert trained and all(not torch.equal(fitted[k], init[k]) for k in trained)


def test_text_warm_start_teaches_object_and_emotion_words(tiny_world):
    """After the warm start, the text tower's features separate captions by emotion and object
    (linear heads fit on them) better than the random tower's."""
    import open_clip

    backbones.register_model_configs()
    rows = data.read_jsonl(Path(tiny_world.root) / "clean" / "clean.jsonl")
    tokenizer = open_clip.get_tokenizer(standins.CLIP_MODEL)
    tokens = tokenizer([c for r in rows for c in r["captions"]]).view(len(rows), len(rows[0]["captions"]), -1)
    emotions = torch.tensor([list(data.EMOTIONS).index(r["emotion"]) for r in rows])

    def emotion_separation(model) -> float:
        """Between-class over total variance of the text features, emotion classes."""
        with torch.inference_mode():
            features = model.encode_text(tokens[:, 0], normalize=True)
        means = torch.stack([features[emotions == c].mean(0) for c in emotions.unique()])
        return float(means.var(0).sum() / features.var(0).sum())

    torch.manual_seed(0)
    model = open_clip.create_model_and_transforms(standins.CLIP_MODEL, pretrained=None)[0]
    before = emotion_separation(model)
    standins._warm_start_text_tower(model, tokens, rows, seed=0, epochs=3)
    after = emotion_separation(model)
    assert after > 2 * before


def test_concurrent_first_runs_build_the_world_once(tmp_path, monkeypatch):
    """Two runs that start together: the second waits on the lock and reuses the first's world;
    a crashed build's staging directory and a partial world are removed, not mistaken for a world."""
    import threading

    key = build.world_key(0, "tiny")
    (tmp_path / key).mkdir()  # a partial world (no _SUCCESS)
    (tmp_path / f".{key}.building-999").mkdir()  # a crashed build's staging directory
    calls, started, release = [], threading.Event(), threading.Event()

    def fake_build(root, seed, size, progress=True):
        calls.append(Path(root))
        started.set()
        release.wait(30)
        (Path(root) / "manifest.jsonl").write_text("")
        return {"timings_s": {}}

    monkeypatch.setattr(build, "build_world", fake_build)
    worlds = []
    first = threading.Thread(target=lambda: worlds.append(build.ensure_world(str(tmp_path), 0, "tiny", False)))
    first.start()
    assert started.wait(30)
    second = threading.Thread(target=lambda: worlds.append(build.ensure_world(str(tmp_path), 0, "tiny", False)))
    second.start()
    second.join(1.5)
    assert second.is_alive()  # waiting for the first build, not building or removing it
    release.set()
    first.join(30)
    second.join(30)
    assert len(calls) == 1 and calls[0].name.startswith(f".{key}.building-")
    assert [w.root for w in worlds] == [str(tmp_path / key)] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [key, f"{key}.lock"]


def test_content_link_zero_draws_objects_independently_of_emotion():
    """At link 0 the object never depends on the emotion: the same random stream gives the same
    objects whatever the emotion (draw_object always consumes the same draws)."""
    for emotion in data.EMOTIONS:
        rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
        first = [data.draw_object(rng_a, emotion, link=0.0) for _ in range(50)]
        second = [data.draw_object(rng_b, "joy", link=0.0) for _ in range(50)]
        assert first == second
    assert set(first) == set(data.OBJECTS)


def test_content_link_one_draws_only_typical_objects():
    rng = np.random.default_rng(0)
    for emotion, typical in data.TYPICAL_OBJECTS.items():
        drawn = {data.draw_object(rng, emotion, link=1.0) for _ in range(50)}
        assert drawn == set(typical)


def test_typical_objects_cover_every_object_once():
    """Each object is typical of exactly one emotion, so the object alone predicts emotion at the
    rate CONTENT_LINK sets and no emotion is favoured overall."""
    typical = [o for pair in data.TYPICAL_OBJECTS.values() for o in pair]
    assert sorted(typical) == sorted(data.OBJECTS)
    assert set(data.TYPICAL_OBJECTS) == set(data.EMOTIONS)


def test_content_link_sets_the_typical_object_rate():
    """The share of samples showing a typical object of their emotion is link + (1 - link) / 4
    (a uniform object is typical with probability 2 / 8), checked on a fixed seed."""
    rng = np.random.default_rng(0)
    for link in (0.0, 0.4, 0.8):
        samples = data.random_samples(rng, 4000, link=link)
        rate = np.mean([s.object in data.TYPICAL_OBJECTS[s.emotion] for s in samples])
        assert abs(rate - (link + (1 - link) / 4)) < 0.03, (link, rate)


def test_content_link_is_a_probability():
    with pytest.raises(ValueError, match="content link"):
        data.draw_object(np.random.default_rng(0), "joy", link=1.5)


def test_worlds_follow_the_content_link(tiny_world):
    """Every file set of the world (training pairs, clean split, downstream) draws its objects
    through the link; the report records it."""
    rows = data.read_jsonl(tiny_world.manifest) + data.read_jsonl(Path(tiny_world.root) / "clean" / "clean.jsonl")
    rate = np.mean([r["object"] in data.TYPICAL_OBJECTS[r["emotion"]] for r in rows])
    expected, independent = data.CONTENT_LINK + (1 - data.CONTENT_LINK) / 4, 0.25
    assert data.CONTENT_LINK > 0 and rate > (expected + independent) / 2, rate
    assert tiny_world.report["content_link"] == data.CONTENT_LINK
    assert tiny_world.report["typical_objects"] == {k: list(v) for k, v in data.TYPICAL_OBJECTS.items()}


def test_report_states_what_the_content_alone_predicts():
    from pacl_ray.world.gap import format_report

    assert "at most 55.0" in format_report({"content_link": 0.4})  # percent points, as every accuracy
    assert "at most 25.0" in format_report({"content_link": 0.0})
    assert "content link" not in format_report({})  # a report of an older world


def test_report_gives_accuracies_in_percent_points():
    """Every accuracy as percent points with one decimal, as the sweep tables; the AUC stays an AUC."""
    from pacl_ray.world.gap import format_report

    report = {
        "planted_split_percent": {"1": 22.0, "2": 25.0, "3": 26.0, "4": 27.0},
        "gap_probe_accuracy": {"random_init": 0.3333, "object_pretrained": 0.48, "ceiling": 0.93,
                               "gap_points": 45.0, "chance": 0.25},
        "scorer": {"factual_score_auc": 0.4856, "anp_top1_emotion_accuracy": 0.2222},
        "content_link": 0.4,
    }
    assert format_report(report) == "\n".join([
        "planted partitions (%): 1: 22.0 / 2: 25.0 / 3: 26.0 / 4: 27.0",
        "downstream emotion probe accuracy: random init 33.3, start 48.0, ceiling 93.0; gap 45.0 points, chance 25.0",
        "  (start: the object-pretrained backbone PACL starts from; ceiling: trained on emotion labels)",
        "factual scorer: factual-score AUC vs planted 0.486, ANP top-1 emotion accuracy 22.2",
        "content link 0.4: the object alone predicts emotion with accuracy at most 55.0",
    ])
    assert "random init n/a" in format_report({})  # a report without the measurement
