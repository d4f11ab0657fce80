"""The one command line: every entry point a subcommand with help and an example, user errors exit 2
in one line, an unwritable output directory is refused before any work, Ctrl-C exits 130 with the
command that resumes."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from pacl_ray import __version__, cli


@pytest.mark.parametrize("stage", ["ingest", "partition", "embed", "cluster", "train", "evaluate", "run"])
def test_help_for_each_stage(stage, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([stage, "--help"])
    assert exc.value.code == 0
    assert "--set" in capsys.readouterr().out


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_entry_point_is_a_subcommand_with_description_example_and_flag_help(capsys):
    parser = cli.build_parser()
    commands = _subparsers(parser)
    assert set(commands) == set(cli.COMMANDS) == {
        "ingest", "partition", "embed", "cluster", "train", "evaluate", "run", "tune", "world", "config"}
    for name, sub in commands.items():
        with pytest.raises(SystemExit) as exc:
            cli.main([name, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert sub.description and len(sub.description) > 40, name
        assert "example:\n  pacl-ray " + name in out, name
        for action in sub._actions:  # every flag (every --manifest included) says what it does
            assert action.help and action.help != argparse.SUPPRESS, (name, action.option_strings)
    assert all(a.help for a in parser._actions)


def test_name_names_the_sweep_and_is_gone_from_stages(capsys):
    # `name` changes nothing a stage writes (outputs are keyed by content), so stages have no --name
    for stage in cli.STAGES:
        with pytest.raises(SystemExit) as exc:
            cli.main([stage, "--name", "x", "--print-config"])
        assert exc.value.code == 2
    tune = _subparsers(cli.build_parser())["tune"]
    assert "sweeps/NAME" in next(a.help for a in tune._actions if "--name" in a.option_strings)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"pacl-ray {__version__}"


def test_world_sizes_match_the_world_builder():
    from pacl_ray.world.build import SIZES

    assert set(cli.WORLD_SIZES) == set(SIZES)


def test_flags_become_overrides(capsys):
    assert cli.main(["cluster", "--k", "2,3,6", "--print-config", "--set", "train.epochs=4"]) == 0
    out = capsys.readouterr().out
    assert "- 6" in out and "epochs: 4" in out


def test_config_error_exits_2(capsys):
    assert cli.main(["train", "--set", "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["train", "--set", "train.temperature=0"], "train.temperature=0.0 is not allowed: expected a number > 0"),
    (["train", "--set", "train.precision=bf61"], "train.precision='bf61' is not allowed: expected one of bf16"),
    (["partition", "--sigma", "1.5"], "partition.sigma=1.5 is not allowed: expected a number in [0, 1]"),
    (["cluster", "--k", "2,x"], "--k '2,x': expected comma-separated integers"),
    (["evaluate", "--protocol", "probe"], "evaluate.protocol='probe' is not allowed"),
])
def test_out_of_domain_values_exit_2_in_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_config_lists_every_key(capsys):
    from pacl_ray import config

    assert cli.main(["config"]) == 0
    out = capsys.readouterr().out
    for info in config.describe_fields():
        assert f"{info.key}  ({info.type}, default " in out
    assert cli.main(["config", "train.temperature"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("train.temperature  (float, default 0.07)") and "allowed: a number > 0" in out
    assert "train.epochs" not in out
    assert cli.main(["config", "trian"]) == 2
    assert "no config key matches trian" in capsys.readouterr().err


def test_missing_inputs_exit_2_before_any_work(tmp_path, monkeypatch, capsys):
    import pacl_ray.stages.runtime

    def no_ray(cfg=None):
        raise AssertionError("Ray started before the inputs were checked")

    monkeypatch.setattr(pacl_ray.stages.runtime, "init_ray", no_ray)
    assert cli.main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: config file not found" in capsys.readouterr().err
    assert cli.main(["ingest", "--manifest", str(tmp_path / "gone.jsonl"), "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ingest.manifest=" in err and "gone.jsonl" in err and "no such file" in err
    for command in ("run", "partition"):  # no manifest at all: said before Ray starts
        assert cli.main([command, "--output-dir", str(tmp_path)]) == 2
        assert "ingest.manifest is empty: pass --manifest FILE" in capsys.readouterr().err
    assert cli.main(["tune", "--space", str(tmp_path / "nospace.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_unreadable_config_file_exits_2(tmp_path, capsys):
    assert cli.main(["train", "--config", str(tmp_path)]) == 2  # a directory
    err = capsys.readouterr().err
    assert f"{tmp_path}: cannot read the config file" in err and err.count("\n") == 1


def _error(kind: str) -> BaseException:
    from pacl_ray.core.kmeans import NotEnoughPointsError
    from pacl_ray.evaluation.datasets import DatasetError
    from pacl_ray.evaluation.evaluate import ExportError, TaskSpecError
    from pacl_ray.stages.ingest import IngestError

    make = {"kmeans": NotEnoughPointsError, "dataset": DatasetError, "task": TaskSpecError,
            "export": ExportError, "ingest": IngestError, "missing": FileNotFoundError}[kind]
    return make(f"{kind}: /data/x.csv row 3 field 'label': bad\nsecond line")


@pytest.mark.parametrize("kind", ["kmeans", "dataset", "task", "export", "ingest", "missing"])
def test_stage_user_errors_exit_2_in_one_line(kind, tmp_path, monkeypatch, capsys):
    import pacl_ray.stages.pipeline
    import pacl_ray.stages.runtime

    def fails(cfg):
        raise _error(kind)

    monkeypatch.setattr(pacl_ray.stages.runtime, "init_ray", lambda cfg=None: None)
    monkeypatch.setattr(pacl_ray.stages.pipeline, "stage_cluster", fails)
    (tmp_path / "m.jsonl").touch()  # an existing manifest: the stage itself is mocked
    assert cli.main(["cluster", "--manifest", str(tmp_path / "m.jsonl"), "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"pacl-ray cluster: {type(_error(kind)).__name__}: {kind}: /data/x.csv row 3 field 'label'")


def test_a_bug_is_not_a_user_error(tmp_path, monkeypatch):
    import pacl_ray.stages.pipeline
    import pacl_ray.stages.runtime

    def bug(cfg):
        raise KeyError("internal")

    monkeypatch.setattr(pacl_ray.stages.runtime, "init_ray", lambda cfg=None: None)
    monkeypatch.setattr(pacl_ray.stages.pipeline, "stage_cluster", bug)
    (tmp_path / "m.jsonl").touch()
    with pytest.raises(KeyError):  # a traceback, for a bug report
        cli.main(["cluster", "--manifest", str(tmp_path / "m.jsonl"), "--output-dir", str(tmp_path)])


@pytest.mark.parametrize("command", [["ingest", "--manifest", "{manifest}"], ["tune"], ["world", "--cache-dir"]])
@pytest.mark.parametrize("uri", [False, True])
def test_unwritable_output_dir_exits_2_before_any_work(command, uri, tmp_path, monkeypatch, capsys):
    import pacl_ray.stages.runtime
    import pacl_ray.world.build

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the output directory was checked")

    monkeypatch.setattr(pacl_ray.stages.runtime, "init_ray", no_work)
    monkeypatch.setattr(pacl_ray.world.build, "ensure_world", no_work)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = f"file://{blocker}/out" if uri else str(blocker / "out")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "x.jpg", "text": "t"}\n')
    argv = [a.replace("{manifest}", str(manifest)) for a in command]
    argv += [out] if command[0] == "world" else ["--output-dir", out]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "is not writable" in err and str(blocker) in err and err.count("\n") == 1


def test_ctrl_c_exits_130_with_what_was_kept_and_the_resume_command(tmp_path, monkeypatch, capsys):
    import pacl_ray.stages.pipeline
    import pacl_ray.stages.runtime

    def interrupted(cfg, validation=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(pacl_ray.stages.runtime, "init_ray", lambda cfg=None: None)
    monkeypatch.setattr(pacl_ray.stages.pipeline, "stage_train", interrupted)
    manifest = tmp_path / "my pairs.jsonl"
    manifest.write_text("")
    argv = ["train", "--manifest", str(manifest), "--output-dir", str(tmp_path / "out")]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and str(tmp_path / "out") in err and "checkpoint" in err
    assert f"resume with: pacl-ray train --manifest '{manifest}' --output-dir {tmp_path / 'out'}" in err


def test_ctrl_c_in_a_sweep_names_the_sweep_directory(monkeypatch, capsys):
    from pacl_ray.sweeps import driver

    def run_tune(*args, on_sweep_dir=None, **kwargs):
        on_sweep_dir("/runs/sweeps/table5")
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "run_tune", run_tune)
    assert cli.main(["tune", "--space", "table5"]) == 130
    err = capsys.readouterr().err
    assert "/runs/sweeps/table5" in err and "resume with: pacl-ray tune --space table5" in err


def test_module_entry_points():
    out = subprocess.run([sys.executable, "-m", "pacl_ray", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "partition" in out.stdout
    out = subprocess.run([sys.executable, "-m", "pacl_ray.tune", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--world-seed" in out.stdout and "--max-concurrent" in out.stdout
    out = subprocess.run([sys.executable, "-m", "pacl_ray.world", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--cache-dir" in out.stdout and "--size" in out.stdout


def test_all_bad_input_exits_2_with_summary(tmp_path, ray_local, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "missing.jpg", "text": "hello"}\n{"image": "gone.png", "text": "  "}\n')
    code = cli.main(["ingest", "--manifest", str(manifest), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]  # Ray Data logs to stderr before it
    assert last.startswith("pacl-ray ingest: IngestError: ") and "missing_file" in last and "Traceback" not in err


def test_train_with_the_validation_probe_on_and_no_task_stops_before_ray(tmp_path, monkeypatch, capsys):
    import pacl_ray.stages.runtime

    monkeypatch.setattr(pacl_ray.stages.runtime, "init_ray", lambda cfg=None: pytest.fail("Ray started"))
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("")
    argv = ["train", "--manifest", str(manifest), "--output-dir", str(tmp_path / "out"),
            "--set", "validation.every_epochs=1"]
    assert cli.main(argv) == 2
    assert "validation.every_epochs=1 needs a labelled task: set validation.task=" in capsys.readouterr().err


# --------------------------------------------------------------------------- what the console says


def test_a_missing_space_is_one_short_line_naming_the_spaces(capsys):
    """Not the ~900 characters of every path tried: the names there, and that a path works too."""
    from pacl_ray.sweeps.driver import REPO_ROOT

    names = ", ".join(sorted(p.stem for p in (REPO_ROOT / "tune_spaces").glob("*.yaml")))
    assert cli.main(["tune", "--space", "nonexist"]) == 2
    err = capsys.readouterr().err
    assert err == (f"pacl-ray tune: SpaceError: space 'nonexist' not found; names in tune_spaces/: {names}; "
                   f"or a path to a YAML file\n")
    assert len(err) < 250 and "default, " in err
    assert cli.main(["tune", "--space", "tabel5"]) == 2
    assert "space 'tabel5' not found; did you mean table5" in capsys.readouterr().err


def test_unknown_keys_name_the_config_file_and_the_close_matches(tmp_path, capsys):
    path = tmp_path / "my.yaml"
    path.write_text("train:\n  epoch: 3\n")
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pacl-ray train: ConfigError: {path}: unknown config key train.epoch; did you mean "
                          f"train.epochs? valid keys under train: ") and err.count("\n") == 1
    assert cli.main(["tune", "--config", str(path)]) == 2  # a sweep's base config says the same
    assert f"{path}: unknown config key train.epoch; did you mean train.epochs?" in capsys.readouterr().err
    assert cli.main(["train", "--set", "train.epoch=3"]) == 2
    assert capsys.readouterr().err.startswith("pacl-ray train: ConfigError: --set train.epoch=3: unknown config key "
                                              "train.epoch; did you mean train.epochs? valid keys under train: ")


def test_a_list_written_without_brackets_gets_the_list_syntax(capsys):
    assert cli.main(["cluster", "--set", "cluster.ks=2,3"]) == 2
    assert capsys.readouterr().err == ("pacl-ray cluster: ConfigError: --set cluster.ks=2,3: cluster.ks: expected a "
                                       "list of integers, got '2,3'; e.g. --set cluster.ks=[2,3]\n")


def _stage_output(tmp_path, cached: bool):
    from pacl_ray.stages.cache import StageOutput

    files = {"config.yaml": (2602, "a"), "report.json": (913, "b"), "histograms.png": (30492, "c"),
             "gallery.html": (291840, "d"), "scores/part-0.parquet": (9600, "e"), "scores/part-1.parquet": (100, "f")}
    return StageOutput("partition", "aa24e082afa13ada", str(tmp_path / "stages" / "partition" / "aa24e082afa13ada"),
                       cached=cached, files=files)


@pytest.mark.parametrize("cached", [False, True])
def test_stage_commands_end_with_a_summary_not_a_repr(cached, tmp_path, monkeypatch, capsys):
    from pacl_ray.stages import pipeline, runtime

    monkeypatch.setattr(runtime, "init_ray", lambda cfg=None: None)
    monkeypatch.setattr(pipeline, "stage_partition", lambda cfg: _stage_output(tmp_path, cached))
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("")
    assert cli.main(["partition", "--manifest", str(manifest), "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    state = "cached, nothing recomputed" if cached else "written"
    assert out == (f"partition: {state}: {tmp_path}/stages/partition/aa24e082afa13ada\n"
                   "  files: config.yaml (2.5 KiB), gallery.html (285.0 KiB), histograms.png (29.8 KiB),\n"
                   "         report.json (913 B), scores/ (2 files, 9.5 KiB)\n")
    assert "StageOutput(" not in out


def test_stage_summary_redacts_credentials_and_lists_nothing_without_a_record():
    from pacl_ray.stages.cache import StageOutput

    out = StageOutput("ingest", "k", "s3://AKIA:SECRET@bucket/runs/stages/ingest/k", cached=False)
    assert cli.format_stage_output(out) == "ingest: written: s3://***@bucket/runs/stages/ingest/k"


def test_train_summary_has_the_validation_probe_when_the_run_had_one():
    from pacl_ray.stages.train import TrainResult

    row = {"phase": "1", "steps": 2, "L1": 1.0, "L2": 0.0, "L3": 0.0, "L4": 0.0, "total": 1.0, "samples_per_s": 50.0}
    history = [{**row, "epoch": 0}, {**row, "epoch": 1, "val_acc": 41.25}]
    result = TrainResult("/r", "k", False, "/r/export/backbone.safetensors", "/r/export/heads.safetensors", "", "",
                         history)
    lines = cli.format_train_result(result).splitlines()
    assert lines[3].endswith("total   samples/s  val_acc")
    assert lines[4] == "      0           1      2   1.000   0.000   0.000   0.000   1.000       50.0        -"
    assert lines[5] == "      1           1      2   1.000   0.000   0.000   0.000   1.000       50.0     41.2"
    result.history = [{**row, "epoch": 0}]  # no probe: no column
    assert "val_acc" not in cli.format_train_result(result)


def test_an_unknown_flag_gets_its_commands_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["tune", "--epochs", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: pacl-ray tune ")
    assert "pacl-ray tune: error: unrecognized arguments: --epochs 3 (config values: --set KEY=VALUE" in err
