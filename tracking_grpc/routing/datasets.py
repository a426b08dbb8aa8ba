"""Routing datasets: OSRM MLD files prepared from an OpenStreetMap extract.

A routing data directory holds one sub-directory per profile, each with one dataset:

    <routing_data_dir>/car/<name>.osrm.*
    <routing_data_dir>/bicycle/<name>.osrm.*
    <routing_data_dir>/foot/<name>.osrm.*

:func:`prepare` runs ``osrm-extract``, ``osrm-partition`` and ``osrm-customize`` (the
tools and profiles ship in the ``osrm-bindings`` wheel) and writes into a staging
directory that replaces the profile's directory only once all three steps succeeded.
A run that fails removes the directories it created itself (``data_dir`` and missing
parents) if nothing was prepared in them; a directory that existed stays.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import osrm

from tracking_grpc.errors import FailedPrecondition, InvalidArgument
from tracking_grpc.files import unreadable

log = logging.getLogger(__name__)

PROFILES = ("car", "bicycle", "foot")
OSRM_HOME = Path(osrm.__file__).parent
TOOLS_DIR = OSRM_HOME / "bin"
PROFILES_DIR = OSRM_HOME / "share" / "profiles"
PREPARE_HINT = (
    "prepare one with `tracking prepare-routing --pbf AREA.osm.pbf "
    "--routing-data-dir DIR` (add `--small-component-size 50` for a small "
    "city-centre extract: docs/routes.md says why) and start the server with "
    "--routing-data-dir DIR"
)


@dataclass(frozen=True, slots=True)
class Dataset:
    """One prepared dataset: the base path OSRM opens, and its profile."""

    profile: str
    base_path: Path

    @property
    def name(self) -> str:
        return self.base_path.name.removesuffix(".osrm")


def parse_profiles(text: str) -> tuple[str, ...]:
    """``"car,foot"`` -> ``("car", "foot")``, checked against the known profiles."""
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in names if p not in PROFILES]
    if unknown or not names:
        raise InvalidArgument("profiles", f"choose from {', '.join(PROFILES)}")
    return names


def prepare(
    pbf: Path,
    data_dir: Path,
    profiles: tuple[str, ...] = PROFILES,
    *,
    threads: int = 2,
    small_component_size: int = 1000,
) -> list[Dataset]:
    """Build an MLD dataset per profile from ``pbf`` into ``data_dir``.

    ``small_component_size`` is OSRM's size (in nodes) below which a connected piece
    of the network is not snapped to when a bigger one is near; city-centre extracts
    whose main network is itself small need a lower value (50 or so).
    """
    fault = unreadable(pbf)
    if fault:
        raise InvalidArgument("pbf", f"{fault}: {pbf}")
    created = _missing_directories(data_dir)
    try:
        return _prepare_each(pbf, data_dir, profiles, threads, small_component_size)
    except BaseException:
        _remove_empty(created)
        raise


def _prepare_each(
    pbf: Path,
    data_dir: Path,
    profiles: tuple[str, ...],
    threads: int,
    small_component_size: int,
) -> list[Dataset]:
    name = pbf.name.split(".")[0]
    datasets = []
    for profile in profiles:
        started = time.perf_counter()
        final_dir = data_dir / profile
        staging = data_dir / f".{profile}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        base = staging / f"{name}.osrm"
        lua = PROFILES_DIR / f"{profile}.lua"
        size = ("--small-component-size", str(small_component_size))
        threads_arg = ("-t", str(threads))
        try:
            _run(
                "osrm-extract",
                str(pbf),
                "-p",
                str(lua),
                "-o",
                str(base),
                *size,
                *threads_arg,
            )
            _run("osrm-partition", str(base), "-t", str(threads), *size)
            _run("osrm-customize", str(base), "-t", str(threads))
        except BaseException:
            # The profile's previous dataset, if any, stays as it was.
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shutil.rmtree(final_dir, ignore_errors=True)
        staging.rename(final_dir)
        datasets.append(Dataset(profile, final_dir / f"{name}.osrm"))
        log.info(
            "prepared %s dataset %s in %.1f s",
            profile,
            name,
            time.perf_counter() - started,
        )
    return datasets


def _missing_directories(path: Path) -> list[Path]:
    """``path`` and its parents that do not exist yet, deepest first: the ones a
    run creates."""
    missing = []
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    return missing


def _remove_empty(directories: list[Path]) -> None:
    """Remove the directories (deepest first) while they are empty: a failed run
    leaves none it created, but keeps the datasets of profiles it did prepare."""
    for directory in directories:
        try:
            directory.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return  # not empty (a prepared profile), or not ours to remove


def discover(data_dir: Path) -> dict[str, Dataset]:
    """The prepared datasets found under ``data_dir``, by profile."""
    found = {}
    for profile in PROFILES:
        bases = sorted((data_dir / profile).glob("*.osrm.mldgr"))
        if bases:
            found[profile] = Dataset(profile, bases[0].with_suffix(""))
    return found


def _run(tool: str, *args: str) -> None:
    command = [str(TOOLS_DIR / tool), *args]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise FailedPrecondition(
            f"{tool} failed (exit {done.returncode}): " + " | ".join(tail)
        )
