"""The sweep's Tune RunConfig: storage as a pyarrow filesystem object plus a plain path, so
credentials in an ``output_dir`` URI never reach Tune's paths, logs or printed state."""

from __future__ import annotations

import pyarrow.fs as pafs

from pacl_ray.sweeps import driver

KEY, SECRET = "AKIDEXAMPLE", "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"


def test_an_s3_uri_with_credentials_becomes_a_filesystem_and_a_plain_path():
    uri = f"s3://{KEY}:{SECRET}@pacl/runs/sweeps/s/tune?region=us-east-1&endpoint_override=127.0.0.1:9&scheme=http"
    run_config = driver.tune_run_config(uri, "s-0123abcd", max_failures=2, callbacks=[])
    assert isinstance(run_config.storage_filesystem, pafs.S3FileSystem)
    assert run_config.storage_path == "pacl/runs/sweeps/s/tune" and run_config.name == "s-0123abcd"
    assert run_config.failure_config.max_failures == 2 and run_config.verbose == 0
    text = repr(run_config)  # what Tune logs and what its RunConfig-derived paths are made of
    assert KEY not in text and SECRET not in text and "s3://" not in text


def test_local_and_file_uri_roots_are_local_paths(tmp_path):
    for root in (str(tmp_path / "tune"), f"file://{tmp_path}/tune"):
        run_config = driver.tune_run_config(root, "s-1", max_failures=0, callbacks=[])
        assert isinstance(run_config.storage_filesystem, pafs.LocalFileSystem), root
        assert run_config.storage_path == str(tmp_path / "tune"), root
