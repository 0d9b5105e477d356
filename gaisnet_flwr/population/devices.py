"""The devices of a cell: where they are, what they are, what they hold (paper Sec. III-B, IV-B).

A run's `population` run-config key names one of:

  * a TOML file: an optional `[defaults]` table and one `[[device]]` table per device;
  * a CSV file: a header row and one row per device (columns as the TOML keys), parsed strictly:
    UTF-8 without a BOM, commas, each column known and named once, the required ones present;
  * `generated:N:SEED`: N devices drawn from SEED (see `generate_population`).

Each device has a `name`, a position `x_m`, `y_m` (metres, in the cell's plane), a device
`profile` (a cost-model preset such as phone-mid, or one from `cost-profiles`), a D2D range
`d2d_range_m` (default 100 m), `data` (it holds labeled training data and can start a
fine-tuning cluster; default true) and `requests` (it asks for SL inference and gets an
inference cluster formed around it; default false). conf/population-example.toml is an example;
docs/configure.md documents the format.

Everything is checked here, before any work, and each refusal names the device: bad positions,
unknown profiles, a device that reaches no other device (no cluster can take it).
"""

from __future__ import annotations

import csv
import io
import math
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from gaisnet_flwr.costs.profiles import Profiles

GENERATED = "generated"
FILE_KINDS = (".toml", ".csv")
MAX_DEVICES = 2000  # one cell; the distance checks hold an N x N matrix (N = 2000: 32 MB)
# generate_population's distributions (stated in its docstring and in docs/configure.md)
GENERATED_PROFILES = ("phone-low", "phone-mid", "phone-high")
GENERATED_RANGE_M = 100.0
GENERATED_NEIGHBOURS = 8.0  # mean devices within range: sets the square's side
GENERATED_DATA_SHARE = 0.5
GENERATED_REQUESTERS_PER_DEVICE = 1 / 20


class PopulationError(ValueError):
    """A population that cannot be used; the message names the device and the problem."""


@dataclass(frozen=True)
class PopulationDevice:
    name: str
    x_m: float
    y_m: float
    profile: str
    d2d_range_m: float = 100.0
    data: bool = True
    requests: bool = False

    def distance_m(self, other: PopulationDevice) -> float:
        return math.dist((self.x_m, self.y_m), (other.x_m, other.y_m))

    def reaches(self, other: PopulationDevice) -> bool:
        """D2D works when each device is within the other's range (service/clustering.py)."""
        return self.distance_m(other) <= min(self.d2d_range_m, other.d2d_range_m)


KEYS = tuple(f.name for f in fields(PopulationDevice))
REQUIRED = ("name", "x_m", "y_m", "profile")


@dataclass(frozen=True)
class Population:
    """The devices, in the order given (the order clusters are formed in), and where from."""

    devices: tuple[PopulationDevice, ...]
    source: str

    def __len__(self) -> int:
        return len(self.devices)

    @property
    def requesters(self) -> list[str]:
        return [d.name for d in self.devices if d.requests]


# -- the run-config value -------------------------------------------------------------------
SPEC_FORMS = "'' (identical clusters), 'generated:N:SEED', or a path to a .toml or .csv file"


def parse_generated(spec: str) -> tuple[int, int] | None:
    """`generated:N:SEED` -> (N, SEED); None when `spec` is not of that form (a file)."""
    if not spec.startswith(GENERATED + ":"):
        return None
    parts = spec.split(":")
    try:
        n, seed = int(parts[1]), int(parts[2])
        if len(parts) != 3:
            raise ValueError
    except (IndexError, ValueError):
        raise PopulationError(
            f"population={spec!r}: expected 'generated:N:SEED' with whole numbers N and SEED"
        ) from None
    if not 3 <= n <= MAX_DEVICES or not 0 <= seed < 2**32:
        raise PopulationError(
            f"population={spec!r}: N must be in [3, {MAX_DEVICES}] and SEED in [0, 2**32 - 1]"
        )
    return n, seed


def check_spec(spec: str) -> None:
    """The run-config value's form alone (no file is read): see SPEC_FORMS."""
    if not spec.strip():
        return
    if parse_generated(spec) is None and Path(spec).suffix.lower() not in FILE_KINDS:
        raise PopulationError(f"population={spec!r} is not valid; give {SPEC_FORMS}")


def load_spec(spec: str, profiles: Profiles) -> Population:
    """The population a non-empty run-config value names, checked (module docstring)."""
    generated = parse_generated(spec)
    if generated is not None:
        return generate_population(*generated, profiles=profiles)
    return load_population(spec, profiles)


# -- files ----------------------------------------------------------------------------------
def load_population(path: str | Path, profiles: Profiles) -> Population:
    """Read a TOML or CSV population file and check it (module docstring)."""
    file = Path(path).expanduser()
    if file.suffix.lower() not in FILE_KINDS:
        raise PopulationError(f"{path}: a population file ends in .toml or .csv")
    if not file.is_file():
        raise PopulationError(f"{path}: no such file (population file, {' or '.join(FILE_KINDS)})")
    try:
        if file.suffix.lower() == ".toml":
            data = file.read_bytes()
            _no_bom(str(path), data)
            rows = _toml_rows(str(path), tomllib.loads(data.decode("utf-8")))
        else:
            rows = _csv_rows(_csv_table(str(path), file.read_bytes()))
    except UnicodeDecodeError as err:
        raise PopulationError(
            f"{path}: is not UTF-8 text (byte {err.start}: {err.object[err.start :][:1]!r})"
        ) from err
    except (tomllib.TOMLDecodeError, csv.Error) as err:
        raise PopulationError(f"{path}: cannot be read: {err}") from err
    return check_population(
        Population(tuple(_device(str(path), r) for r in rows), str(path)), profiles
    )


def _toml_rows(where: str, doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    unknown = sorted(set(doc) - {"defaults", "device"})
    if unknown:
        raise PopulationError(f"{where}: unknown table(s) {unknown}; valid: defaults, device")
    defaults = doc.get("defaults", {})
    devices = doc.get("device", [])
    if not isinstance(defaults, dict) or not isinstance(devices, list):
        raise PopulationError(
            f"{where}: [defaults] must be a table and [[device]] an array of tables"
        )
    bad = sorted(set(defaults) - (set(KEYS) - {"name", "x_m", "y_m"}))
    if bad:
        raise PopulationError(
            f"{where}: [defaults] key(s) {bad} are not valid; valid: "
            f"{', '.join(k for k in KEYS if k not in ('name', 'x_m', 'y_m'))}"
        )
    return [{**defaults, **row} if isinstance(row, dict) else row for row in devices]


def _no_bom(where: str, data: bytes) -> None:
    if data.startswith(b"\xef\xbb\xbf"):
        raise PopulationError(
            f"{where}: starts with a UTF-8 byte-order mark (BOM, as Excel's 'CSV UTF-8' writes); "
            f"save it as UTF-8 without a BOM"
        )


def _csv_table(where: str, data: bytes) -> list[dict[str, str]]:
    """The rows of a population CSV (column -> cell), its header checked before any row is
    read: UTF-8 without a byte-order mark, comma-separated, each column known and named once,
    every required column there; then no row longer or shorter than the header. Blank lines
    are skipped."""
    _no_bom(where, data)
    reader = csv.reader(io.StringIO(data.decode("utf-8")))

    def lines() -> Iterator[tuple[int, list[str]]]:
        """(line number, cells) of each non-blank row; a malformed one named by its line."""
        try:
            for row in reader:
                if any(cell.strip() for cell in row):
                    yield reader.line_num, row
        except csv.Error as err:
            raise PopulationError(f"{where}: line {reader.line_num}: {err}") from err

    rows_in = lines()
    first = next(rows_in, None)
    if first is None:
        raise PopulationError(
            f"{where}: is empty; a population CSV starts with a header row such as "
            f"{','.join(REQUIRED)}"
        )
    header = first[1]
    columns = [cell.strip() for cell in header]
    if len(columns) == 1:
        for delimiter, name in ((";", "semicolons"), ("\t", "tabs"), ("|", "bars")):
            if delimiter in columns[0]:
                raise PopulationError(
                    f"{where}: the header {header[0][:80]!r} is one column: the file is "
                    f"separated by {name} ({delimiter!r}); a population CSV is separated by "
                    f"commas (columns {', '.join(KEYS)})"
                )
    blank = [i + 1 for i, c in enumerate(columns) if not c]
    if blank:
        raise PopulationError(f"{where}: header column {blank[0]} has no name")
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise PopulationError(
            f"{where}: column(s) {repeated} appear more than once in the header (each column once)"
        )
    unknown = [c for c in columns if c not in KEYS]
    if unknown:
        raise PopulationError(
            f"{where}: unknown column(s) {[c[:40] for c in unknown]}; valid: {', '.join(KEYS)}"
        )
    missing = [k for k in REQUIRED if k not in columns]
    if missing:
        raise PopulationError(
            f"{where}: lacks column(s) {', '.join(missing)} (required: {', '.join(REQUIRED)})"
        )
    rows = []
    for number, row in rows_in:
        if len(row) > len(columns):
            raise PopulationError(
                f"{where}: line {number} has more values than the header has columns "
                f"({len(row)} > {len(columns)})"
            )
        if len(row) < len(columns):
            raise PopulationError(
                f"{where}: line {number} has {len(row)} value(s), the header {len(columns)} "
                f"columns (an empty cell, not a missing one, takes the default)"
            )
        rows.append(dict(zip(columns, row, strict=True)))
    return rows


def _csv_rows(rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        cleaned: dict[str, Any] = {}
        for key, text in row.items():
            text = text.strip()
            if not text:
                continue  # an empty cell takes the default
            if key in ("x_m", "y_m", "d2d_range_m"):
                try:
                    cleaned[key] = float(text)
                except ValueError:
                    cleaned[key] = text  # refused by _device, with the device's name
            elif key in ("data", "requests"):
                cleaned[key] = {"true": True, "false": False, "1": True, "0": False}.get(
                    text.lower(), text
                )
            else:
                cleaned[key] = text
        out.append(cleaned)
    return out


def _device(where: str, row: Any) -> PopulationDevice:
    if not isinstance(row, dict):
        raise PopulationError(f"{where}: every [[device]] must be a table, got {row!r}")
    name = row.get("name")
    who = f"{where}: device {name!r}" if isinstance(name, str) and name else f"{where}: a device"
    if not isinstance(name, str) or not name.strip():
        raise PopulationError(f"{who} has no name (every device needs a non-empty 'name')")
    unknown = sorted(set(row) - set(KEYS))
    if unknown:
        raise PopulationError(f"{who}: unknown key(s) {unknown}; valid: {', '.join(KEYS)}")
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise PopulationError(f"{who} lacks {', '.join(missing)} (required: {', '.join(REQUIRED)})")
    for key in ("x_m", "y_m", "d2d_range_m"):
        if key not in row:
            continue
        value = row[key]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            what = "a position" if key != "d2d_range_m" else "a D2D range"
            raise PopulationError(
                f"{who}: bad position: {key}={value!r} is not a finite number of metres ({what})"
                if key != "d2d_range_m"
                else f"{who}: {key}={value!r} is not a finite number of metres ({what})"
            )
    if "d2d_range_m" in row and row["d2d_range_m"] <= 0:
        raise PopulationError(f"{who}: d2d_range_m={row['d2d_range_m']!r} must be > 0 metres")
    for key in ("data", "requests"):
        if key in row and not isinstance(row[key], bool):
            raise PopulationError(f"{who}: {key}={row[key]!r} must be true or false")
    if not isinstance(row["profile"], str):
        raise PopulationError(f"{who}: profile={row['profile']!r} must be a device profile name")
    values: dict[str, Any] = {
        k: (float(v) if k in ("x_m", "y_m", "d2d_range_m") else v) for k, v in row.items()
    }
    return PopulationDevice(**values)


# -- checks ---------------------------------------------------------------------------------
def check_population(population: Population, profiles: Profiles) -> Population:
    """Refuse, naming the device: duplicate names, unknown profiles, fewer than 3 devices, and
    a device that reaches no other device over D2D (no cluster can take it)."""
    where = population.source
    devices = population.devices
    if len(devices) < 3:
        raise PopulationError(
            f"{where}: {len(devices)} device(s); a cluster needs at least 3 (start point, a "
            f"peer, end point)"
        )
    if len(devices) > MAX_DEVICES:
        raise PopulationError(f"{where}: {len(devices)} devices; at most {MAX_DEVICES}")
    seen: set[str] = set()
    for d in devices:
        if d.name in seen:
            raise PopulationError(
                f"{where}: device {d.name!r} appears twice (names must be unique)"
            )
        seen.add(d.name)
        if d.profile not in profiles.devices:
            raise PopulationError(
                f"{where}: device {d.name!r}: unknown device profile {d.profile!r}; valid: "
                f"{', '.join(sorted(profiles.devices))} (or add it in cost-profiles)"
            )
    xy = np.array([(d.x_m, d.y_m) for d in devices])
    ranges = np.array([d.d2d_range_m for d in devices])
    dist = np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    reach = dist <= np.minimum(ranges[:, None], ranges[None, :])
    for i, d in enumerate(devices):
        if not reach[i].any():
            j = int(np.argmin(dist[i]))
            raise PopulationError(
                f"{where}: device {d.name!r} at ({d.x_m:g}, {d.y_m:g}) m reaches no other device "
                f"over D2D (nearest: {devices[j].name!r} at {dist[i, j]:.0f} m; ranges "
                f"{d.d2d_range_m:g} m and {devices[j].d2d_range_m:g} m): no cluster can take it"
            )
    return population


# -- generated ------------------------------------------------------------------------------
def generate_population(n: int, seed: int, profiles: Profiles | None = None) -> Population:
    """N devices drawn from `seed` (numpy's default_rng), with these distributions:

      * profile: uniform over phone-low, phone-mid, phone-high;
      * position: uniform in a square of side r * sqrt(N * pi / 8) (r = 100 m, every device's
        D2D range), so a device has 8 others within range on average away from the square's
        edges (fewer near them, so fewer on average over a small population); a device that
        would reach no other is drawn again (so none is out of every range);
      * data: each device holds labeled data with probability 1/2;
      * requests: round(N / 20) devices (at least 1), drawn from those without data, ask for
        inference.

    Names are d000, d001, ...; the same N and seed give the same population.
    """
    rng = np.random.default_rng([seed, n])
    side = GENERATED_RANGE_M * math.sqrt(n * math.pi / GENERATED_NEIGHBOURS)
    xy = np.round(rng.uniform(0.0, side, size=(n, 2)), 2)  # as reported: centimetres
    for _ in range(1000):  # re-draw isolated devices until none is left
        dist = np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1))
        np.fill_diagonal(dist, np.inf)
        isolated = np.flatnonzero(dist.min(axis=1) > GENERATED_RANGE_M)
        if not len(isolated):
            break
        xy[isolated] = np.round(rng.uniform(0.0, side, size=(len(isolated), 2)), 2)
    kinds = rng.integers(0, len(GENERATED_PROFILES), size=n)
    data = rng.random(n) < GENERATED_DATA_SHARE
    without = np.flatnonzero(~data)
    wanted = min(max(1, round(n * GENERATED_REQUESTERS_PER_DEVICE)), len(without))
    requests = set(rng.choice(without, size=wanted, replace=False).tolist()) if wanted else set()
    width = max(3, len(str(n - 1)))
    devices = tuple(
        PopulationDevice(
            name=f"d{i:0{width}d}",
            x_m=float(xy[i, 0]),
            y_m=float(xy[i, 1]),
            profile=GENERATED_PROFILES[int(kinds[i])],
            d2d_range_m=GENERATED_RANGE_M,
            data=bool(data[i]),
            requests=i in requests,
        )
        for i in range(n)
    )
    population = Population(devices, f"{GENERATED}:{n}:{seed}")
    return check_population(population, profiles) if profiles is not None else population
