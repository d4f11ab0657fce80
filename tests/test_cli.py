"""The command line: help for every stage, config errors exit 2, the resolved config prints."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pacl_ray import cli


@pytest.mark.parametrize("stage", ["ingest", "partition", "embed", "cluster", "train", "evaluate", "run"])
def test_help_for_each_stage(stage, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([stage, "--help"])
    assert exc.value.code == 0
    assert "--set" in capsys.readouterr().out


def test_flags_become_overrides(capsys):
    assert cli.main(["cluster", "--k", "2,3,6", "--print-config", "--set", "train.epochs=4"]) == 0
    out = capsys.readouterr().out
    assert "- 6" in out and "epochs: 4" in out


def test_config_error_exits_2(capsys):
    assert cli.main(["train", "--set", "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "pacl_ray", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "partition" in out.stdout


def test_all_bad_input_exits_1_with_summary(tmp_path, ray_local, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "missing.jpg", "text": "hello"}\n{"image": "gone.png", "text": "  "}\n')
    code = cli.main(["ingest", "--manifest", str(manifest), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert "IngestError" in err and "missing_file" in err
