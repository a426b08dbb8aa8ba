"""`tracking prepare-routing`: datasets from an OpenStreetMap extract."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import NETWORK, ROOT, require_shared
from tracking_grpc.routing import datasets


def prepare_routing(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "tracking_grpc", "prepare-routing", *args]
    return subprocess.run(
        command, capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_prepare_routing_writes_a_dataset_per_profile(tmp_path) -> None:
    pbf = require_shared(NETWORK / "helsinki.osm.pbf")
    done = prepare_routing(
        "--pbf",
        str(pbf),
        "--profiles",
        "foot,bicycle",
        "--routing-data-dir",
        str(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    assert sorted(datasets.discover(tmp_path)) == ["bicycle", "foot"]
    assert "foot: " in done.stdout


def test_prepare_routing_refuses_an_unknown_profile(tmp_path) -> None:
    pbf = require_shared(NETWORK / "helsinki.osm.pbf")
    done = prepare_routing(
        "--pbf", str(pbf), "--profiles", "boat", "--routing-data-dir", str(tmp_path)
    )
    assert done.returncode == 2
    assert "choose from car, bicycle, foot" in done.stderr
    assert datasets.discover(tmp_path) == {}


def test_prepare_routing_reports_a_missing_file(tmp_path) -> None:
    missing = str(tmp_path / "none.osm.pbf")
    done = prepare_routing("--pbf", missing, "--routing-data-dir", str(tmp_path))
    assert done.returncode == 2
    assert "no such file" in done.stderr


def test_prepare_routing_says_a_directory_is_no_pbf_file(tmp_path) -> None:
    extract = tmp_path / "extract.osm.pbf"
    extract.mkdir()
    done = prepare_routing("--pbf", str(extract), "--routing-data-dir", str(tmp_path))
    assert done.returncode == 2
    assert f"not a regular file: {extract}" in done.stderr


def test_prepare_routing_refuses_a_file_as_the_data_dir(tmp_path) -> None:
    pbf = require_shared(NETWORK / "helsinki.osm.pbf")
    taken = tmp_path / "routing"
    taken.write_text("not a directory\n")
    done = prepare_routing(
        "--pbf", str(pbf), "--profiles", "foot", "--routing-data-dir", str(taken)
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--routing-data-dir" in lines[0], done.stderr
    assert "not a directory" in lines[0]
    assert taken.read_text() == "not a directory\n"


def test_prepare_routing_leaves_no_staging_after_a_failed_step(tmp_path) -> None:
    csv = tmp_path / "taxis.csv"
    csv.write_text("device_id,lat,lon\n1,60.17,24.94\n")
    previous = tmp_path / "routing" / "foot" / "helsinki.osrm.mldgr"
    previous.parent.mkdir(parents=True)
    previous.write_bytes(b"a complete earlier dataset")
    done = prepare_routing(
        "--pbf",
        str(csv),
        "--profiles",
        "foot",
        "--routing-data-dir",
        str(tmp_path / "routing"),
    )
    assert done.returncode == 2
    assert "osrm-extract failed" in done.stderr
    assert sorted(p.name for p in (tmp_path / "routing").iterdir()) == ["foot"]
    assert previous.read_bytes() == b"a complete earlier dataset"


def test_prepare_routing_refuses_a_negative_small_component_size(tmp_path) -> None:
    pbf = require_shared(NETWORK / "helsinki.osm.pbf")
    done = prepare_routing(
        "--pbf",
        str(pbf),
        "--routing-data-dir",
        str(tmp_path),
        "--small-component-size",
        "-1",
    )
    assert done.returncode == 2
    assert "argument --small-component-size" in done.stderr
    assert "above 0" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_readme_route_section_names_the_small_component_size() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Route:")[1].split("\n## ")[0]
    assert "`--small-component-size 50`" in section
    assert "docs/routes.md#preparing-a-routing-dataset" in section


def test_a_failed_first_run_leaves_no_data_dir_it_created(tmp_path) -> None:
    """The data directory and its missing parent, created by the run, go with
    its failure; an empty directory that existed before stays."""
    csv = tmp_path / "taxis.csv"
    csv.write_text("device_id,lat,lon\n1,60.17,24.94\n")
    created = tmp_path / "var" / "routing"
    done = prepare_routing(
        "--pbf", str(csv), "--profiles", "foot", "--routing-data-dir", str(created)
    )
    assert done.returncode == 2
    assert "osrm-extract failed" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taxis.csv"]
    existing = tmp_path / "empty"
    existing.mkdir()
    done = prepare_routing(
        "--pbf", str(csv), "--profiles", "foot", "--routing-data-dir", str(existing)
    )
    assert done.returncode == 2
    assert existing.is_dir() and list(existing.iterdir()) == []
