"""Weights files, checked before anything is built from them (foundation='file' and the cloud's).

A checkpoint a user brings is the one input no run-config check can see into, so it is read
once at start-up (`check_weights_file`, from `RunConfig.check_environment`) and again, by the
same code, wherever the backbone is built (`load_backbone_weights`). Every refusal is a
`CheckpointFileError` that names the file, the tensor (key) and the problem:

  * the format comes from the content, not the name: a torch file (zip, or the legacy pickle),
    safetensors, or a JAX/big_vision `.npz` (timm's `load_pretrained` converts it);
  * loading is safe only: `torch.load(weights_only=True)` (a pickle that asks for any other
    object is refused; no code runs), safetensors, and numpy without pickles;
  * the state is a table of tensors whose names, shapes and dtypes are the model's (built on
    the meta device: shapes only) and whose every value is finite;
  * the classifier (`head`, `head_dist`) is the exception: the edges learn their own classes, so
    a head that is missing or shaped for other classes is left fresh (VPT), and logged.

Dtypes, an explicit rule (`HALF_RULES`): float32 is loaded as it is; float16 and bfloat16 are
converted to float32 when `half="convert"` (exact: every such value is a float32) and logged,
or refused when `half="refuse"` (the cloud's own checkpoints, which it writes in float32);
float64 is refused (rounding to float32 would change the weights, and values past 3.4e38 would
become inf); integers and booleans are refused where the model holds floats.
"""

from __future__ import annotations

import copy
import functools
import io
import logging
import math
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

log = logging.getLogger("gaisnet.checkpoint")

FORMATS = ("torch (zip)", "torch (pickle)", "safetensors", "npz")
HALF_RULES = ("convert", "refuse")
HALF = (torch.float16, torch.bfloat16)
# timm's wrappers around a state dict (`timm.models.load_state_dict`, in its order of preference)
WRAPPERS = ("state_dict_ema", "model_ema", "state_dict", "model")
FRESH = ("head", "head_dist")  # classifier modules a checkpoint need not (or cannot) fill
MAX_SAFETENSORS_HEADER = 100 * 2**20  # the safetensors library's own limit
NPZ_ANCHORS = (  # one of these names a JAX ViT checkpoint (timm's `_load_weights`)
    "embedding/kernel",
    "opt/target/embedding/kernel",
    "params/embedding/kernel",
    "params/img/embedding/kernel",
)


class CheckpointFileError(ValueError):
    """A weights file that cannot be used; the message names the file, the key and the problem."""


# -- the file: its format, read safely ----------------------------------------------------------
def file_format(path: Path) -> str:
    """One of FORMATS, from the file's first bytes (and a zip's member names)."""
    if not path.exists():
        raise CheckpointFileError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointFileError(f"{path}: is a folder, not a weights file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointFileError(f"{path}: is empty (0 bytes), not a weights file")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except Exception as err:  # noqa: BLE001 - BadZipFile, a name that is not text, ...
            raise CheckpointFileError(
                f"{path}: a damaged zip archive ({type(err).__name__}: {_first_line(err)})"
            ) from err
        if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            return "torch (zip)"
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        raise CheckpointFileError(
            f"{path}: a zip archive of {names[:3]}, neither a torch file (data.pkl) nor a .npz "
            f"(.npy arrays)"
        )
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:  # a pickle (torch's legacy format)
        return "torch (pickle)"
    declared = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if 2 <= declared <= min(size - 8, MAX_SAFETENSORS_HEADER) and head[8:9] == b"{":
        return "safetensors"
    hint = ""
    if path.suffix.lower() == ".safetensors":
        hint = (
            f"; the name says safetensors, but its header length ({declared} bytes) does not fit "
            f"in the file's {size}"
        )
    elif head.startswith(b"\x93NUMPY"):
        hint = "; it is a single numpy array (.npy), not a table of named weights"
    raise CheckpointFileError(
        f"{path}: not a weights file: its content is none of {', '.join(FORMATS)} "
        f"(first bytes {head[:8].hex(' ')}){hint}"
    )


def load_torch(source: Path | bytes, where: str) -> Any:
    """`torch.load` with `weights_only=True` (tensors and plain containers only: no code runs),
    every failure a `CheckpointFileError` naming `where`."""
    try:
        # A file object, not a path: torch.load picks a loader by a path's suffix.
        with io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb") as data:
            return torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            reason = _first_line(err)
            raise CheckpointFileError(f"{where}: a damaged torch file ({reason})") from err
        wanted = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({wanted.group(1)})" if wanted else ""
        raise CheckpointFileError(
            f"{where}: refused: it pickles objects other than tensors and plain containers"
            f"{what}; only weights are loaded (weights_only), nothing in it ran. Save the "
            f"model's state_dict()"
        ) from err
    except Exception as err:  # noqa: BLE001 - a truncated zip, a bad magic number, ...
        raise CheckpointFileError(
            f"{where}: cannot be read as a torch file: {type(err).__name__}: {_first_line(err)}"
        ) from err


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except Exception as err:  # noqa: BLE001 - SafetensorError, a bad header, a short file
        raise CheckpointFileError(
            f"{path}: cannot be read as safetensors: {type(err).__name__}: {_first_line(err)}"
        ) from err


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise CheckpointFileError(
                f"{path}: refused: a .npz holding Python objects (pickled arrays); only numeric "
                f"arrays are loaded"
            ) from err
        raise CheckpointFileError(f"{path}: cannot be read as .npz: {_first_line(err)}") from err
    except Exception as err:  # noqa: BLE001
        raise CheckpointFileError(
            f"{path}: cannot be read as .npz: {type(err).__name__}: {_first_line(err)}"
        ) from err


def unwrap(obj: Any, where: str) -> Any:
    """The state dict inside timm's wrappers (`state_dict`, `model`, EMA), without the
    `module.` prefix DataParallel adds; anything else as it is."""
    if isinstance(obj, dict):
        for key in WRAPPERS:
            if isinstance(obj.get(key), dict):
                log.info("%s: reading the weights under %r", where, key)
                obj = obj[key]
                break
    if isinstance(obj, dict) and obj and all(str(k).startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


# -- the state against the model -----------------------------------------------------------------
def check_state(
    state: Any,
    reference: Mapping[str, torch.Tensor],
    where: str,
    fresh: tuple[str, ...] = (),
    half: str = "convert",
) -> dict[str, torch.Tensor]:
    """`state` checked against `reference` (the model's tensors, on any device, meta included):
    a table of tensors with exactly its names (those under a `fresh` prefix may be missing or
    shaped otherwise: they are dropped), each of its shape, of its dtype under the dtype rule
    (module docstring), and finite. Returns the state to load; raises `CheckpointFileError`."""
    if half not in HALF_RULES:
        raise ValueError(f"half={half!r}; valid: {', '.join(HALF_RULES)}")
    if not isinstance(state, dict):
        raise CheckpointFileError(
            f"{where}: holds a {type(state).__name__}, not a state dict (a table of tensors by "
            f"name)"
        )
    odd = [k for k in state if not isinstance(k, str)]
    if odd:
        raise CheckpointFileError(f"{where}: key {odd[0]!r:.60} is not a tensor name (a string)")
    is_fresh = tuple(f"{p}." for p in fresh)
    unexpected = sorted(k for k in state if k not in reference)
    if unexpected:
        raise CheckpointFileError(
            f"{where}: {len(unexpected)} tensor(s) the model does not have: "
            f"{_few(unexpected)} (the model's are e.g. {_few(sorted(reference), 3)})"
        )
    missing = sorted(k for k in reference if k not in state and not k.startswith(is_fresh))
    if missing:
        raise CheckpointFileError(
            f"{where}: lacks {len(missing)} of the model's tensors: {_few(missing)}"
        )
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    converted: list[str] = []
    for key in sorted(state):
        value, want = state[key], reference[key]
        if not isinstance(value, torch.Tensor):
            raise CheckpointFileError(f"{where}: {key!r} is a {type(value).__name__}, not a tensor")
        if value.layout != torch.strided or value.is_quantized:
            raise CheckpointFileError(
                f"{where}: tensor {key!r} is {value.layout} / {value.dtype}; only dense tensors"
            )
        if tuple(value.shape) != tuple(want.shape):
            if key.startswith(is_fresh):
                dropped.append(key)
                continue
            raise CheckpointFileError(
                f"{where}: tensor {key!r} has shape {tuple(value.shape)}, the model's "
                f"{tuple(want.shape)}"
            )
        if value.dtype != want.dtype:
            value = _dtype_rule(value, want.dtype, key, where, half)
            converted.append(key)
        if value.is_floating_point():
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise CheckpointFileError(
                    f"{where}: tensor {key!r} holds {bad} non-finite value(s) (NaN or inf) of "
                    f"{value.numel()}; nothing can be trained on it"
                )
        out[key] = value
    if converted:
        log.warning(
            "%s: %d tensor(s) stored in half precision converted to float32 (exact), e.g. %s",
            where,
            len(converted),
            converted[0],
        )
    left = sorted({k for k in reference if k.startswith(is_fresh)} - set(out))
    if left:
        log.warning(
            "%s: the classifier (%s) is left fresh%s",
            where,
            _few(left, 2),
            f": the file's is shaped for other classes ({_few(dropped, 2)})" if dropped else "",
        )
    return out


def _dtype_rule(
    value: torch.Tensor, want: torch.dtype, key: str, where: str, half: str
) -> torch.Tensor:
    name = str(value.dtype).removeprefix("torch.")
    wanted = str(want).removeprefix("torch.")
    if value.dtype in HALF and want == torch.float32:
        if half == "convert":
            return value.to(torch.float32)
        raise CheckpointFileError(
            f"{where}: tensor {key!r} is {name}; this checkpoint must be {wanted} (half "
            f"precision is not converted here)"
        )
    why = (
        " (rounding to float32 would change the weights; save them as float32)"
        if value.dtype == torch.float64
        else ""
    )
    raise CheckpointFileError(f"{where}: tensor {key!r} is {name}, the model's {wanted}{why}")


# -- a user's weights file for a timm ViT --------------------------------------------------------
def fresh_modules(backbone: nn.Module) -> tuple[str, ...]:
    """The classifier modules of `backbone` (`head`, and `head_dist` for DeiT-distilled)."""
    return tuple(name for name in FRESH if hasattr(backbone, name))


def read_weights_file(path: str | Path, backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The checked state of a weights file for `backbone` (a timm ViT, on the meta device or
    not), ready for `load_state_dict(strict=False)`; `CheckpointFileError` otherwise."""
    file = Path(path).expanduser()
    kind = file_format(file)
    reference = backbone.state_dict()
    fresh = fresh_modules(backbone)
    if kind == "npz":
        return check_state(_from_npz(file, backbone), reference, str(file), fresh)
    obj = _load_safetensors(file) if kind == "safetensors" else load_torch(file, str(file))
    return check_state(unwrap(obj, str(file)), reference, str(file), fresh)


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Fill `backbone` (a real one) from a weights file, checked as `read_weights_file` says."""
    state = read_weights_file(path, backbone)
    backbone.load_state_dict(state, strict=False)


def check_weights_file(path: str | Path, backbone: nn.Module) -> None:
    """Start-up check of a weights file against `backbone` (on the meta device): the same checks
    as the load, done once per file version and model (inode, size and change times key it)."""
    file = Path(path).expanduser()
    try:
        stat = file.stat()
        version = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    except OSError:
        version = (-1, -1, -1, -1)  # file_format names what is wrong
    _check_cached(str(file), version, backbone)


@functools.lru_cache(maxsize=8)
def _check_cached(path: str, version: tuple[int, ...], backbone: nn.Module) -> None:
    read_weights_file(path, backbone)


def _from_npz(path: Path, backbone: nn.Module) -> dict[str, torch.Tensor]:
    """A JAX ViT `.npz`, its arrays checked, converted by timm's `load_pretrained` into a CPU copy
    of `backbone` whose tensors start as NaN, so a tensor the file did not fill is found (and
    named) by the finiteness check. The copy holds the model's weights once (ViT-B: 340 MB)."""
    arrays = _load_npz(path)
    if not any(anchor in arrays for anchor in NPZ_ANCHORS):
        raise CheckpointFileError(
            f"{path}: a .npz of {_few(sorted(arrays), 3)}, not a JAX ViT checkpoint (it lacks "
            f"'embedding/kernel'; timm reads big_vision / AugReg files)"
        )
    for name, array in arrays.items():
        if array.dtype.kind not in "fiub":
            raise CheckpointFileError(f"{path}: array {name!r} is {array.dtype}, not numeric")
        if array.dtype == np.float64:
            raise CheckpointFileError(
                f"{path}: array {name!r} is float64 (save the weights as float32)"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise CheckpointFileError(
                f"{path}: array {name!r} holds {bad} non-finite value(s) (NaN or inf)"
            )
    if not hasattr(backbone, "load_pretrained"):
        raise CheckpointFileError(f"{path}: a .npz, and {type(backbone).__name__} cannot read one")
    model = copy.deepcopy(backbone).to_empty(device="cpu")
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(math.nan)
    try:
        model.load_pretrained(str(path))  # type: ignore[operator]  # timm ViT's npz reader
    except KeyError as err:  # numpy: "NAME is not a file in the archive"
        name = str(err.args[0]).removesuffix(" is not a file in the archive")
        raise CheckpointFileError(f"{path}: the .npz lacks array {name!r}") from err
    except Exception as err:  # noqa: BLE001 - a shape timm cannot map, a missing layer, ...
        raise CheckpointFileError(
            f"{path}: timm cannot convert this .npz for the model: {type(err).__name__}: "
            f"{_first_line(err)}"
        ) from err
    state = model.state_dict()
    fresh = tuple(f"{p}." for p in fresh_modules(backbone))
    unset = sorted(
        k
        for k, t in state.items()
        if t.is_floating_point() and t.numel() and bool(torch.isnan(t).all())
    )
    missing = [k for k in unset if not k.startswith(fresh)]
    if missing:
        raise CheckpointFileError(
            f"{path}: the .npz fills none of {len(missing)} of the model's tensors: {_few(missing)}"
        )
    return {k: v for k, v in state.items() if k not in unset}


def _few(names: list[str], n: int = 5) -> str:
    shown = ", ".join(repr(k) for k in names[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]
