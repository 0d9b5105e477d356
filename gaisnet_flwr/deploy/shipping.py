"""A file that travels between machines by hash: the foundation, cloud -> edge -> start point.

The cloud writes the foundation checkpoint once (`cloud/foundation.py`:
`foundation-<model>-<key>.pt` and a `.sha256` sidecar of its exact bytes). In a deployment no one
copies it by hand: each tier asks its nodes which checkpoints they hold (their identity reply
lists file name -> SHA-256, computed from the bytes: `held`) and sends the file to a node that
lacks it (`contract.QUERY_FOUNDATION`, a `ShippedFile`). The receiver hashes the bytes it got,
refuses anything that does not match the SHA-256 that came with them, naming the file, and
writes file and sidecar atomically into its own foundation folder; the model code then reads
it through the same check every checkpoint gets (`foundation.read_checkpoint`: sidecar,
configuration, every tensor). After that only tunable modules travel.

No torch here: the cloud-facing SuperNode of an edge (a fresh process per message) receives the
file with Flower and this module alone.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

# What a shipped checkpoint may be called: a plain file name the cloud writes, never a path.
FOUNDATION_NAME = re.compile(r"foundation-[A-Za-z0-9_.\-]{1,200}\.pt")


class ShippingError(ValueError):
    """A shipped file that is refused: its name, or bytes that do not hash to what was sent."""


def foundation_folder(foundation_dir: str) -> Path:
    """Where foundation checkpoints live: `foundation_dir` (run-config, or a SuperNode's own
    node-config foundation-dir), or ~/.cache/gaisnet-flwr."""
    if foundation_dir.strip():
        return Path(foundation_dir).expanduser().resolve()
    return Path.home() / ".cache" / "gaisnet-flwr"


def sidecar(path: Path) -> Path:
    """The SHA-256 sidecar of a checkpoint: `<name>.sha256` beside it."""
    return path.with_name(path.name + ".sha256")


def sha256_of(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename: a reader never sees half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def recorded_sha256(path: Path) -> str | None:
    """The digest a checkpoint's sidecar records, or None (missing, unreadable, not text)."""
    try:
        return sidecar(path).read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


@dataclass(frozen=True)
class ShippedFile:
    """A checkpoint as it travels: its file name, the SHA-256 of its bytes, the bytes."""

    name: str
    sha256: str
    payload: bytes

    @classmethod
    def read(cls, path: Path) -> ShippedFile:
        """The sender's side: the file and the digest its sidecar records, which must be the
        digest of its bytes (a sender never passes on a file it cannot vouch for)."""
        payload = path.read_bytes()
        recorded = recorded_sha256(path)
        if recorded != sha256_of(payload):
            raise ShippingError(
                f"{path} does not match its SHA-256 sidecar (corrupt or partial): not shipped"
            )
        return cls(path.name, recorded, payload)

    def install(self, directory: Path) -> Path:
        """The receiver's side: check the name and the bytes, then write the file and its
        sidecar into `directory`. Raises ShippingError naming the file."""
        if not FOUNDATION_NAME.fullmatch(self.name):
            raise ShippingError(
                f"refused a shipped file named {self.name!r}: only a foundation checkpoint "
                f"(foundation-<model>-<key>.pt, a plain file name) travels"
            )
        got = sha256_of(self.payload)
        if got != self.sha256:
            raise ShippingError(
                f"foundation {self.name}: the {len(self.payload):,} bytes received hash to "
                f"SHA-256 {got[:16]}..., not the {self.sha256[:16]}... sent with them: refused "
                f"(corrupt or tampered with on the way); nothing was written"
            )
        path = Path(directory).expanduser() / self.name
        write_atomic(path, self.payload)
        write_atomic(sidecar(path), self.sha256.encode())
        return path


# (path, size, mtime in ns) -> the SHA-256 of the file's bytes: every identity query lists what
# its node holds, and a simulation's nodes (long-lived Ray workers) share one folder, so a
# checkpoint of hundreds of MB is hashed once per process, not once per node.
_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """The SHA-256 of the file's bytes (cached while its size and mtime stay)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_of(path.read_bytes())
    return _DIGESTS[key]


def held(directory: Path) -> dict[str, str]:
    """The foundation checkpoints in `directory` that match their sidecar: file name -> SHA-256
    (of the bytes). A file that does not match is not held: it is shipped anew."""
    found: dict[str, str] = {}
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("foundation-*.pt")):
        recorded = recorded_sha256(path)
        try:
            if recorded is not None and file_sha256(path) == recorded:
                found[path.name] = recorded
        except OSError:
            continue
    return found
