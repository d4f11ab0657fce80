"""Typed config: YAML + dotted overrides, errors that name the key, round trip through save."""

from __future__ import annotations

import pytest
import yaml

from pacl_ray import config as C
from pacl_ray.formats import storage


def test_defaults_follow_the_paper():
    cfg = C.RunConfig()
    assert cfg.partition.sigma == 0.7 and cfg.cluster.ks == [2] and cfg.train.temperature == 0.07
    assert cfg.train.epochs == 30 and cfg.train.global_batch_size == 64
    assert cfg.train.lr_heads == 1e-3 and cfg.model.embed_dim == 768
    assert cfg.evaluate.linear_lr == 1e-2 and cfg.evaluate.linear_epochs == 40


# One row per default that the paper (or, where it is silent, SPEC) fixes: (key, value, source).
# Each fails on its own when the default drifts; the source is also required beside the field.
PAPER_AND_SPEC_DEFAULTS = [
    ("partition.sigma", 0.7, "paper 3.1"),
    ("cluster.ks", [2], "paper 3.2"),
    ("train.k", 2, "paper 4.2"),
    ("train.temperature", 0.07, "paper 4.2"),
    ("train.epochs", 30, "paper 4.2"),
    ("train.global_batch_size", 64, "paper 4.2"),
    ("train.lr_heads", 1e-3, "paper 4.2"),
    ("train.objective", "pacl", "paper 3.3"),
    ("train.schedule", "progressive", "paper Eqs. 15-17"),
    ("train.partitions", [1, 2, 3, 4], "SPEC Choice sample usage"),
    ("partition.use_scores", "both", "paper 3.1"),
    ("model.embed_dim", 768, "SPEC Paper defaults Choice"),
    ("train.weight_decay", 0.02, "SPEC Training recipe Choice: 0.02"),
    ("train.warmup_steps", 0, "SPEC Training recipe Choice: 0"),
    ("train.crop_scale", [0.5, 1.0], "SPEC Training recipe Choice: at least half"),
    ("train.hflip", 0.5, "SPEC Training recipe Choice"),
    ("train.color_jitter", 0.0, "SPEC Training recipe Choice: off"),
    ("evaluate.linear_lr", 1e-2, "paper 4.4"),
    ("evaluate.linear_epochs", 40, "paper 4.4"),
    ("evaluate.finetune_epochs", 40, "paper 4.4"),
    ("evaluate.prompts", ["A photo with {} emotion.", "The photo makes me feel so {}!"], "paper 4.5.2"),
]


@pytest.mark.parametrize("key, value, source", PAPER_AND_SPEC_DEFAULTS, ids=[k for k, _, _ in PAPER_AND_SPEC_DEFAULTS])
def test_each_default_is_the_paper_or_spec_value_and_says_so(key, value, source):
    infos = {info.key: info for info in C.describe_fields()}
    assert infos[key].default == value, f"{key} drifted from {source}"
    assert source in infos[key].meaning, f"{key}: its meaning should cite {source!r}: {infos[key].meaning!r}"


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 3, "temperature": 0.05}, "cluster": {"ks": [2, 3]}}))
    cfg = C.load_config(str(path), ["train.epochs=30", "partition.sigma=1", "cluster.ks=[2, 6]", "name=x"])
    assert cfg.train.epochs == 30 and cfg.train.temperature == 0.05
    assert cfg.partition.sigma == 1.0 and isinstance(cfg.partition.sigma, float)
    assert cfg.cluster.ks == [2, 6] and cfg.name == "x"


def test_exponent_floats_without_a_dot():
    # PyYAML reads "3e-3" as a string (YAML 1.1); a float field still takes it, a string field keeps it
    path_cfg = C.load_config(None, ["train.lr_backbone=3e-3", "train.lr_heads=+1E2", "name=1e3"])
    assert path_cfg.train.lr_backbone == 3e-3 and path_cfg.train.lr_heads == 100.0 and path_cfg.name == "1e3"
    with pytest.raises(C.ConfigError, match="train.lr_heads"):
        C.load_config(None, ["train.lr_heads=e-3"])
    # a negative exponent float parses, and then its domain refuses it (learning rates are > 0)
    with pytest.raises(C.ConfigError, match=r"train.lr_heads=-100.0 is not allowed: expected a number > 0"):
        C.load_config(None, ["train.lr_heads=-1E2"])


def test_optional_fields_accept_null_and_values():
    cfg = C.load_config(None, ["train.max_workers=4", "partition.sigma_factual=null"])
    assert cfg.train.max_workers == 4 and cfg.partition.sigma_factual is None


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.epochz=3", "train.epochz"),
        ("trian.epochs=3", "trian"),
        ("train.epochs=three", "train.epochs"),
        ("train.epochs=1.5", "train.epochs"),
        ("cluster.ks=2", "cluster.ks"),
        ("cluster.ks=[2, x]", r"cluster.ks\[1\]"),
        ("ingest.clean_text=maybe", "ingest.clean_text"),
        ("train=3", "train"),
        ("no_equals_sign", "section.key=value"),
    ],
)
def test_bad_keys_and_types_name_the_key(override, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load_config(None, [override])


def test_bad_yaml_top_level(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(C.ConfigError, match="mapping"):
        C.load_config(str(path))


def test_save_round_trip_through_file_uri(tmp_path):
    cfg = C.load_config(None, ["train.epochs=5", "cluster.ks=[2,3]"])
    uri = C.save_config(cfg, f"file://{tmp_path}/run")
    assert uri.startswith("file://")
    again = C.load_config(uri)
    assert again == cfg
    assert storage.exists(str(tmp_path / "run" / "config.yaml"))


def test_merge_is_deep():
    merged = C.merge({"train": {"epochs": 3, "k": 2}}, {"train": {"epochs": 5}, "name": "n"})
    assert merged == {"train": {"epochs": 5, "k": 2}, "name": "n"}


# --------------------------------------------------------------------------- domains (SPEC Training recipe)


def _leaf_fields(cls):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from ((f"{f.name}.{k}", sub) for k, sub in _leaf_fields(hints[f.name]))
        else:
            yield f.name, f


def test_every_field_has_a_type_default_meaning_and_a_default_inside_its_domain():
    fields = dict(_leaf_fields(C.RunConfig))
    infos = {info.key: info for info in C.describe_fields()}
    assert set(infos) == set(fields) and len(fields) > 60
    defaults = C.to_dict(C.RunConfig())
    for key, f in fields.items():
        info = infos[key]
        assert info.type and info.meaning and len(info.meaning) > 10, key
        assert "\n" not in info.meaning, key
        default = defaults
        for part in key.split("."):
            default = default[part]
        assert info.default == default, key
        domain = f.metadata["domain"]
        assert domain is info.domain, key
        if domain is not None:
            assert info.allowed, key
            C.check_domain(key, default, domain)  # raises when the default is outside
        # every field round-trips its own default through load
        assert C.load_config(None, [f"{key}={__import__('json').dumps(default)}"]) == C.RunConfig(), key


def test_fields_that_must_have_a_domain_have_one():
    infos = {info.key: info for info in C.describe_fields()}
    # every named choice, and every number whose meaning has a bound
    for key in ("train.precision", "embed.precision", "partition.precision", "evaluate.precision",
                "train.objective", "train.schedule", "partition.factual_calibration",
                "partition.emotional_calibration", "model.text_pooling", "partition.sentiment_pooling",
                "evaluate.protocol", "ingest.format", "embed.feature_dtype", "train.temperature",
                "partition.sigma", "partition.sigma_factual", "partition.sigma_emotional", "train.k",
                "cluster.ks", "train.global_batch_size", "train.epochs", "train.lr_heads", "train.lr_backbone",
                "train.crop_scale", "train.hflip", "evaluate.linear_lr", "evaluate.batch_size",
                "ingest.max_image_side"):
        assert infos[key].domain is not None, key
    for info in C.describe_fields():  # every str field either names its choices or is a free name/path
        if info.type == "str" and info.domain is None:
            assert info.key.split(".")[-1] in {
                "address", "backbone", "backbone_pretrained", "backbone_checkpoint", "text_encoder",
                "manifest", "clip_model", "clip_pretrained", "anp_vocab", "sentiment_model", "name",
                "output_dir", "mlflow_uri", "mlflow_experiment", "wandb_project", "task"}, info.key


@pytest.mark.parametrize(
    "override,named,allowed",
    [
        ("train.temperature=0", "train.temperature=0.0", "a number > 0"),
        ("train.temperature=-0.07", "train.temperature=-0.07", "a number > 0"),
        ("train.temperature=.nan", "train.temperature=nan", "a number > 0"),
        ("train.precision=bf61", "train.precision='bf61'", "one of bf16, fp16, fp32"),
        ("train.objective=simclr", "train.objective='simclr'", "one of pacl, clip"),
        ("partition.factual_calibration=zscore", "partition.factual_calibration='zscore'",
         "one of raw, clipscore, rank"),
        ("partition.sigma=1.5", "partition.sigma=1.5", "a number in [0, 1]"),
        ("partition.sigma=-0.1", "partition.sigma=-0.1", "a number in [0, 1]"),
        ("partition.sigma_factual=2", "partition.sigma_factual=2.0", "a number in [0, 1]"),
        ("train.k=0", "train.k=0", "a number >= 1"),
        ("cluster.ks=[2, 0]", "cluster.ks[1]=0", "a number >= 1"),
        ("cluster.ks=[]", "cluster.ks=[]", "a non-empty list, each a number >= 1"),
        ("train.global_batch_size=0", "train.global_batch_size=0", "a number >= 1"),
        ("train.epochs=0", "train.epochs=0", "a number >= 1"),
        ("model.text_pooling=max", "model.text_pooling='max'", "one of cls, mean"),
        ("evaluate.protocol=probe", "evaluate.protocol='probe'", "one or more of linear, finetune, zeroshot (joined by ',')"),
        ("ingest.format=xml", "ingest.format='xml'", "one of auto, jsonl, csv, parquet, webdataset, tumemo"),
        ("ingest.max_image_side=-512", "ingest.max_image_side=-512", "a number >= 0"),
        ("train.crop_scale=[0.5]", "train.crop_scale=[0.5]", "2 items, each a number in (0, 1]"),
        ("train.crop_scale=[0, 1]", "train.crop_scale[0]=0.0", "a number in (0, 1]"),
        ("train.hflip=1.5", "train.hflip=1.5", "a number in [0, 1]"),
        ("train.resources_per_worker={GPU: -1}", "train.resources_per_worker.GPU=-1.0", "a number >= 0"),
        ("train.lr_backbone=0", "train.lr_backbone=0.0", "a number > 0"),
    ],
)
def test_out_of_domain_values_name_key_value_and_allowed(override, named, allowed):
    with pytest.raises(C.ConfigError) as err:
        C.load_config(None, [override])
    assert str(err.value) == f"{named} is not allowed: expected {allowed}"


def test_domains_apply_to_yaml_files_and_layers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"temperature": 0.0}}))
    with pytest.raises(C.ConfigError, match=r"train.temperature=0.0 is not allowed"):
        C.load_config(str(path))
    with pytest.raises(C.ConfigError, match=r"train.precision='bf61'"):
        C.layer_config({"train.precision": "bf61"})
    with pytest.raises(C.ConfigError, match=r"partition.sigma=3.0"):
        C.layer_config({"partition": {"sigma": 3}})


def test_edges_of_domains_are_allowed():
    cfg = C.load_config(None, ["partition.sigma=0", "partition.sigma_emotional=1", "train.k=1",
                               "evaluate.protocol=linear,finetune", "train.max_failures=-1",
                               "train.crop_scale=[1, 1]", "train.temperature=1e-4"])
    assert cfg.partition.sigma == 0.0 and cfg.evaluate.protocol == "linear,finetune"
    with pytest.raises(C.ConfigError, match="evaluate.protocol='linear,probe'"):
        C.load_config(None, ["evaluate.protocol=linear,probe"])


@pytest.mark.parametrize("section", ["partition", "embed", "evaluate"])
def test_inference_pools_have_typed_bounds(section, tmp_path):
    default = getattr(C.RunConfig(), section)
    assert (default.min_actors, default.max_actors) == (1, 1)  # one actor per model on a laptop
    cfg = C.load_config(None, [f"{section}.min_actors=2", f"{section}.max_actors=8"])
    assert (getattr(cfg, section).min_actors, getattr(cfg, section).max_actors) == (2, 8)
    assert getattr(C.load_config(None, [f"{section}.max_actors=4"]), section).min_actors == 1
    with pytest.raises(C.ConfigError) as err:
        C.load_config(None, [f"{section}.max_actors=0"])
    assert str(err.value) == f"{section}.max_actors=0 is not allowed: expected a number >= 1"
    with pytest.raises(C.ConfigError, match=f"{section}.min_actors: expected an integer, got 1.5"):
        C.load_config(None, [f"{section}.min_actors=1.5"])
    with pytest.raises(C.ConfigError) as err:
        C.load_config(None, [f"{section}.min_actors=3", f"{section}.max_actors=2"])
    assert str(err.value) == (f"{section}.min_actors=3 is not allowed: expected at most {section}.max_actors=2 "
                              f"(the pool autoscales between them)")
    path = tmp_path / "old.yaml"  # a config written before the pools autoscaled
    path.write_text(yaml.safe_dump({section: {"concurrency": 4}}))
    with pytest.raises(C.ConfigError) as err:
        C.load_config(str(path))
    assert str(err.value) == (f"config key {section}.concurrency was replaced by {section}.min_actors and "
                              f"{section}.max_actors (an autoscaling actor pool; the old concurrency: N is "
                              f"min_actors: N, max_actors: N)")
    with pytest.raises(C.ConfigError, match=f"{section}.concurrency was replaced"):
        C.load_config(None, [f"{section}.concurrency=2"])


def test_layer_config_order_later_wins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 3, "k": 3}}))
    data = C.layer_config({"train": {"epochs": 1, "temperature": 0.1}}, str(path), {"train.epochs": 5},
                          ["train.k=4"], None)
    assert (data["train"]["epochs"], data["train"]["k"], data["train"]["temperature"]) == (5, 4, 0.1)
    assert data == C.to_dict(C.from_dict(data))  # every key present and validated
    # nested layers deep-merge; a dotted key replaces its value (a mapping included), as --set does
    workers = C.layer_config({"train": {"resources_per_worker": {"CPU": 8}}}, {"train": {"resources_per_worker": {"GPU": 1}}})
    assert workers["train"]["resources_per_worker"] == {"CPU": 8, "GPU": 1}
    workers = C.layer_config({"train": {"resources_per_worker": {"CPU": 8}}}, {"train.resources_per_worker": {"GPU": 1}})
    assert workers["train"]["resources_per_worker"] == {"GPU": 1}


def test_missing_and_unreadable_config_files_are_config_errors(tmp_path):
    with pytest.raises(C.ConfigError, match="nope.yaml: config file not found"):
        C.load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [1\n")
    with pytest.raises(C.ConfigError, match="bad.yaml: not valid YAML"):
        C.load_config(str(bad))


def test_partition_args_default_thresholds_to_sigma():
    pcfg = C.PartitionConfig(sigma=0.5)
    assert C.thresholds(pcfg) == (0.5, 0.5)
    assert C.thresholds(C.PartitionConfig(sigma=0.5, sigma_factual=0.2)) == (0.2, 0.5)
    assert C.thresholds(C.PartitionConfig(sigma=0.5, sigma_emotional=0.9)) == (0.5, 0.9)
    assert C.partition_args(C.PartitionConfig(factual_calibration="rank")) == {
        "sigma_factual": 0.7, "sigma_emotional": 0.7, "factual_calibration": "rank",
        "emotional_calibration": "clipscore", "use_scores": "both"}
    assert C.partition_args(C.PartitionConfig(use_scores="factual"))["use_scores"] == "factual"


@pytest.mark.parametrize("override", ["partition.sigma=0.5", "partition.sigma_factual=0.2", "partition.sigma_emotional=0.2",
                                      "partition.factual_calibration=rank", "partition.emotional_calibration=raw",
                                      "partition.use_scores=factual", "partition.use_scores=emotional"])
def test_every_partition_argument_changes_the_partition_stage_key(override):
    from pacl_ray.stages import partition
    from pacl_ray.stages.cache import StageOutput

    scores = StageOutput("scores", "k", "unused", cached=True)
    assert partition.partition_key(C.load_config(None, [override]), scores) != partition.partition_key(C.RunConfig(), scores)


def test_sample_usage_keys_refuse_unknown_values():
    with pytest.raises(C.ConfigError, match=r"train.partitions\[1\]=5 is not allowed: expected one of 1, 2, 3, 4"):
        C.load_config(None, ["train.partitions=[1, 5]"])
    with pytest.raises(C.ConfigError, match=r"train.partitions=\[\] is not allowed"):
        C.load_config(None, ["train.partitions=[]"])
    with pytest.raises(C.ConfigError, match="partition.use_scores='text' is not allowed: expected one of both, factual, emotional"):
        C.load_config(None, ["partition.use_scores=text"])


def test_model_args_are_build_model_arguments():
    import inspect

    from pacl_ray.core.pacl_model import build_backbone, build_model

    args = C.model_args(C.load_config(None, ["seed=3", "train.image_size=64"]))
    accepted = set(inspect.signature(build_model).parameters) | set(inspect.signature(build_backbone).parameters)
    assert set(args) <= accepted and args["seed"] == 3 and args["image_size"] == 64


def test_format_fields_lists_every_key():
    text = C.format_fields()
    for info in C.describe_fields():
        assert f"\n{info.key}  (" in f"\n{text}", info.key
    assert "allowed: one of bf16, fp16, fp32" in text and "allowed: a number > 0" in text


def test_saved_configs_never_hold_credentials(tmp_path):
    """Issue #17: an output URI with credentials is redacted in every saved or printed C."""
    cfg = C.from_dict({"output_dir": "s3://AKIA:SECRET@bucket/runs"})
    text = C.dump_config(cfg)
    assert "SECRET" not in text and "AKIA" not in text and "s3://***@bucket/runs" in text
    saved = C.save_config(cfg, str(tmp_path))
    assert "SECRET" not in open(saved).read()
    assert cfg.output_dir == "s3://AKIA:SECRET@bucket/runs"  # the run itself still uses it


# --------------------------------------------------------------------------- error messages that help


TRAIN_KEYS = ", ".join(sorted(f.name for f in __import__("dataclasses").fields(C.TrainConfig)))
TOP_KEYS = "cluster, embed, evaluate, ingest, model, name, output_dir, partition, ray, seed, tracking, train, validation"


@pytest.mark.parametrize("override,message", [
    ("train.epoch=3", f"--set train.epoch=3: unknown config key train.epoch; did you mean train.epochs? "
                      f"valid keys under train: {TRAIN_KEYS}"),
    ("trian.epochs=3", f"--set trian.epochs=3: unknown config key trian; did you mean train or tracking? "
                       f"valid keys at the top level: {TOP_KEYS}"),
    # no close match in the section: the same name in another section
    ("train.sigma=0.3", f"--set train.sigma=0.3: unknown config key train.sigma; did you mean partition.sigma? "
                        f"valid keys under train: {TRAIN_KEYS}"),
    ("train.zzz=1", f"--set train.zzz=1: unknown config key train.zzz; valid keys under train: {TRAIN_KEYS}"),
])
def test_unknown_set_keys_name_close_matches_and_the_sections_keys(override, message):
    with pytest.raises(C.ConfigError) as err:
        C.load_config(None, [override])
    assert str(err.value) == message


def test_unknown_keys_in_a_config_file_name_the_file(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(C.ConfigError) as err:
        C.load_config(str(path), ["train.epochs=3"])  # a valid --set does not hide the file's mistake
    assert str(err.value) == (f"{path}: unknown config key train.epoch; did you mean train.epochs? "
                              f"valid keys under train: {TRAIN_KEYS}")
    path.write_text("partiton:\n  sigma: 0.5\n")
    with pytest.raises(C.ConfigError) as err:
        C.load_config(str(path))
    assert str(err.value) == (f"{path}: unknown config key partiton; did you mean partition? "
                              f"valid keys at the top level: {TOP_KEYS}")
    # a dotted layer (a sweep space's values) has no file to name; the rest is the same
    with pytest.raises(C.ConfigError) as err:
        C.layer_config({"train.epoch": 3})
    assert str(err.value) == f"unknown config key train.epoch; did you mean train.epochs? valid keys under train: {TRAIN_KEYS}"


@pytest.mark.parametrize("override,message", [
    # lists: the kind of item, and the value written as a list
    ("cluster.ks=2,3", "--set cluster.ks=2,3: cluster.ks: expected a list of integers, got '2,3'; "
                       "e.g. --set cluster.ks=[2,3]"),
    ("cluster.ks=2", "--set cluster.ks=2: cluster.ks: expected a list of integers, got 2; e.g. --set cluster.ks=[2,3]"),
    ("cluster.ks=[2, x]", "--set cluster.ks=[2, x]: cluster.ks[1]: expected an integer, got 'x'; "
                          "e.g. --set cluster.ks=[2,3]"),
    ("train.crop_scale=0.5", "--set train.crop_scale=0.5: train.crop_scale: expected a list of numbers, got 0.5; "
                             "e.g. --set train.crop_scale=[0.5,1.0]"),
    ("evaluate.tasks=single:fi=/d,x", "--set evaluate.tasks=single:fi=/d,x: evaluate.tasks: expected a list of "
                                      "strings, got 'single:fi=/d,x'; e.g. --set evaluate.tasks=[single:fi=/d,x]"),
    # bool, optional bool, int, optional int, float, optional float, str, mapping
    ("ingest.clean_text=maybe", "--set ingest.clean_text=maybe: ingest.clean_text: expected true/false, got 'maybe'; "
                                "e.g. --set ingest.clean_text=true"),
    ("train.compile=maybe", "--set train.compile=maybe: train.compile: expected true, false or null, got 'maybe'; "
                            "e.g. --set train.compile=true or --set train.compile=null"),
    ("train.epochs=1.5", "--set train.epochs=1.5: train.epochs: expected an integer, got 1.5; e.g. --set train.epochs=30"),
    ("train.max_workers=x", "--set train.max_workers=x: train.max_workers: expected an integer or null, got 'x'; "
                            "e.g. --set train.max_workers=1 or --set train.max_workers=null"),
    ("partition.sigma=abc", "--set partition.sigma=abc: partition.sigma: expected a number, got 'abc'; "
                            "e.g. --set partition.sigma=0.7"),
    ("partition.sigma_factual=x", "--set partition.sigma_factual=x: partition.sigma_factual: expected a number or "
                                  "null, got 'x'; e.g. --set partition.sigma_factual=0.5 or "
                                  "--set partition.sigma_factual=null"),
    ("name=[1]", "--set name=[1]: name: expected a string, got [1]; e.g. --set name=pacl"),
    ("train.resources_per_worker=4", "--set train.resources_per_worker=4: train.resources_per_worker: expected a "
                                     "mapping of names to numbers, got 4; "
                                     "e.g. --set 'train.resources_per_worker={name: 0.5}'"),
    ("train=3", "--set train=3: train: expected a mapping, got int; e.g. --set train.objective=pacl"),
])
def test_type_errors_show_the_type_and_the_syntax_that_works(override, message):
    with pytest.raises(C.ConfigError) as err:
        C.load_config(None, [override])
    assert str(err.value) == message


def test_every_list_field_gets_the_list_syntax():
    for info in C.describe_fields():
        if info.type.startswith("list["):
            with pytest.raises(C.ConfigError) as err:
                C.load_config(None, [f"{info.key}=1,2"])
            assert "expected a list of" in str(err.value), info.key
            assert f"e.g. --set {info.key}=[" in str(err.value), info.key


def test_type_errors_in_files_and_layers_show_yaml_syntax(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("cluster:\n  ks: 2,3\n")
    with pytest.raises(C.ConfigError) as err:
        C.load_config(str(path))
    assert str(err.value) == f"{path}: cluster.ks: expected a list of integers, got '2,3'; e.g. ks: [2, 3]"
    with pytest.raises(C.ConfigError) as err:
        C.layer_config({"cluster.ks": "2,3"})
    assert str(err.value) == "cluster.ks: expected a list of integers, got '2,3'; e.g. cluster.ks: [2, 3]"


def test_key_error_says_why_a_dotted_key_is_not_a_config_key():
    assert C.key_error("train.epochs") is None and C.key_error("model.backbone_kwargs.drop_path_rate") is None
    assert C.key_error("train.epoch") == (f"unknown config key train.epoch; did you mean train.epochs? "
                                          f"valid keys under train: {TRAIN_KEYS}")
    assert C.key_error("train.epoch", named=False) == f"did you mean train.epochs? valid keys under train: {TRAIN_KEYS}"
    assert C.key_error("train") == f"train is a section, not a key; valid keys under train: {TRAIN_KEYS}"
    assert C.key_error("train.epochs.x") == "train.epochs is a value, not a section: train.epochs.x is not a config key"
