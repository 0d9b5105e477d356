"""Turn timm's pretrained weights, downloaded on another machine, into a checkpoint file of the
run's model for `foundation='file'`, on machines that cannot reach the weights' host.

`foundation='file'` loads a weights file whose tensors have the run's model's names and shapes
(the classifier head excepted: it starts fresh when it does not fit; `vit.checkpoint`). timm's
download is for timm's own shape of the model: at another `img-size` its position embedding has
another length and the file is refused. This command builds the run's model the way
`foundation='timm'` does, from the local weights file (timm resamples the position embedding
when the image size differs and drops the classifier when the class count does), with a fresh
head seeded by the run seed, and saves its state dict.

On a machine with internet, the weights file of `vit_base_patch16_224` (what the paper's preset
uses) is, for example, `model.safetensors` of the Hugging Face repo
`timm/vit_base_patch16_224.augreg2_in21k_ft_in1k` (the repo `timm.models.get_pretrained_cfg(name)
.hf_hub_id` names; `timm.create_model(name, pretrained=True)` leaves it under
~/.cache/huggingface/hub/). Copy it over, then:

    python scripts/timm_checkpoint.py --weights model.safetensors \\
        --run-config conf/paper-vitb16-flowers102.toml --out foundation.pt
    flwr run . --run-config ...   # with foundation='file' checkpoint-path='/abs/foundation.pt'
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gaisnet_flwr.config import ConfigError, RunConfig, parse_overrides

# torch, timm and the model code are imported by the functions that use them, so that
# importing this module (a command's --help) is instant.


def convert(weights: Path, cfg: RunConfig, out: Path, num_classes: int | None = None) -> Path:
    """Build `cfg`'s model from the timm weights file `weights` (a fresh head for the dataset's
    classes, seeded by the run seed) and save its state dict where `foundation='file'` reads it."""
    import torch

    from gaisnet_flwr.data.images import dataset_classes
    from gaisnet_flwr.derived import data_spec
    from gaisnet_flwr.vit.model import build_prompted_vit

    if not weights.is_file():
        raise ConfigError(f"--weights {weights}: not a file")
    classes = num_classes or dataset_classes(data_spec(cfg))
    m = cfg.model
    torch.manual_seed(cfg.run.seed)
    model = build_prompted_vit(
        m.model_name,
        mode=m.mode,
        num_prompts=m.num_prompts,
        num_classes=classes,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(weights.resolve())},
        img_size=m.img_size,
        patch_size=m.patch_size,
        depth=m.depth,
        embed_dim=m.embed_dim,
        num_heads=m.num_heads,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.backbone.state_dict(), out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--weights", type=Path, required=True, help="timm's weights file")
    parser.add_argument(
        "--run-config",
        default="",
        help='the run\'s model and dataset: "key=value ..." or a .toml preset (as flwr run)',
    )
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint file to write")
    parser.add_argument(
        "--num-classes", type=int, default=None, help="the head's classes (default: the dataset's)"
    )
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.run_config) if args.run_config else {}
        cfg = RunConfig.of(**{k.replace("-", "_"): v for k, v in overrides.items()})
        path = convert(args.weights, cfg, args.out, args.num_classes)
    except (ConfigError, OSError, RuntimeError) as err:
        parser.exit(2, f"error: {err}\n")
    print(
        f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); run with "
        f"--run-config \"foundation='file' checkpoint-path='{path.resolve()}'\""
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
