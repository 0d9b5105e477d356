"""The support table (docs/vit-support.md, made by `scripts/vit_support.py`) lists every ViT-like
name the installed timm holds, agrees with docs/vits.md and docs/configure.md, and its refusals are
what PromptedViT says today; no name is left inexact or failing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from gaisnet_flwr.experiments.vit_support import (
    SUMMARY_BEGIN,
    SUMMARY_END,
    TINY_SHAPES,
    check_name,
    vit_like_names,
)
from gaisnet_flwr.vit.model import MODES, ModelError, build_prompted_vit

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "vit-support.md"
ROW = re.compile(r"^\| `([^`]+)` \| (\S+) \| (\S+) \| ([^|]+) \| ([^|]+) \| (.+) \|$", re.M)


def summary(text: str) -> str:
    start = text.index(SUMMARY_BEGIN)
    return text[start : text.index(SUMMARY_END, start) + len(SUMMARY_END)]


def rows() -> dict[str, tuple[str, ...]]:
    """name -> (module, class, block, tiny shape, status per mode)."""
    found = {}
    for m in ROW.finditer(PAGE.read_text()):
        name, module, cls, block, shape, cells = m.groups()
        found[name] = (module, cls, block.strip(), shape.strip(), *cells.split(" | "))
    return found


def reasons() -> dict[int, str]:
    return {int(n): r for n, r in re.findall(r"(?m)^(\d+)\. (.+)$", summary(PAGE.read_text()))}


def test_the_table_names_every_vit_like_model_of_the_installed_timm() -> None:
    listed = {name: module for name, module in vit_like_names()}
    table = {name: row[0] for name, row in rows().items()}
    assert table == listed, (
        "timm changed: run python scripts/vit_support.py --out docs/vit-support.md"
    )


@pytest.mark.parametrize("page", ["docs/vits.md", "docs/configure.md"])
def test_readme_and_configure_show_the_generated_summary(page: str) -> None:
    assert summary((REPO / page).read_text()) == summary(PAGE.read_text())


def test_every_name_is_exact_or_refused_with_a_reason() -> None:
    notes = reasons()
    for name, row in rows().items():
        for mode, cell in zip(MODES, row[4:], strict=True):
            assert cell == "exact" or re.fullmatch(r"(refused|not built) \[\d+\]", cell), (
                name,
                mode,
                cell,
            )
            if cell != "exact":
                assert int(cell.split("[")[1][:-1]) in notes


def _representatives() -> list[str]:
    """The first name of each class, block and outcome (a summary row)."""
    seen, names = set(), []
    for name, row in rows().items():
        if row[1:3] + row[4:] not in seen:
            seen.add(row[1:3] + row[4:])
            names.append(name)
    return names


@pytest.mark.parametrize("name", _representatives() if PAGE.exists() else [])
def test_each_summary_row_still_builds_or_refuses_as_recorded(name: str) -> None:
    # On the meta device (seconds for all rows): a name recorded exact still builds in that
    # mode, one recorded refused is still refused with the recorded reason.
    module, cls, _block, shape_text, *cells = rows()[name]
    notes = reasons()
    shape = next(
        (s for s in TINY_SHAPES if ", ".join(f"{k}={v}" for k, v in s.items()) == shape_text),
        TINY_SHAPES[0],
    )
    for mode, cell in zip(MODES, cells, strict=True):
        if cell.startswith("not built"):
            continue
        prompts = 2 if mode.startswith("vpt") else 0
        with torch.device("meta"):
            if cell == "exact":
                model = build_prompted_vit(name, mode=mode, num_prompts=prompts, **shape)
                assert type(model.backbone).__name__ == cls
            else:
                reason = notes[int(cell.split("[")[1][:-1])]
                with pytest.raises(ModelError) as refused:
                    build_prompted_vit(name, mode=mode, num_prompts=prompts, **shape)
                assert reason in str(refused.value), (mode, str(refused.value))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["vit_small_patch16_dinov3", "vit_relpos_small_patch16_224", "naflexvit_base_patch16_map"],
)
def test_the_command_checks_a_name_as_the_table_records(name: str) -> None:
    result = check_name(name, rows()[name][0])
    recorded = rows()[name][4:]
    assert [m if m == "exact" else m.split(":")[0] for m in result.modes] == [
        c if c == "exact" else c.split(" [")[0] for c in recorded
    ]
