"""Check rsvheat against the official vHeat / RS-vHeat modules (not shipped here; bring your own checkout).

    python scripts/check_against_official.py --vheat PATH/TO/vHeat/classification/models/vHeat.py \
        --rsvheat PATH/TO/RS-vHeat/models/vHeat/RS_vHeat.py

For each variant: build the official model with random weights, load its state dict into ``rsvheat`` (through the
official-checkpoint converter) and into ``rsvheat.testing.OfficialStructureHeat``, run the same float32 input, and
print the relative error of the logits. Needs ``einops`` (imported by the official files).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import rsvheat
from rsvheat.testing.official_source import import_official
from rsvheat.testing.official_structure import OfficialStructureHeat


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def check(official: torch.nn.Module, variant: str, size: int, modality: str = "optical") -> dict:
    torch.manual_seed(0)
    official.eval()
    in_chans = 3 if modality == "optical" else 1
    x = torch.randn(2, in_chans, size, size)
    with torch.no_grad():
        ref = (
            official(x)
            if not hasattr(official, "heat_capacity")
            else official.classifier(official.forward_features(x, mode="opt" if modality == "optical" else "sar"))
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "official.pth"
        torch.save({"model": official.state_dict()}, path)
        ours = rsvheat.create_model(variant, img_size=size, modalities={modality: in_chans}).eval()
        rsvheat.load_checkpoint(ours, path)
        cfg = rsvheat.VARIANTS[variant]
        mirror = OfficialStructureHeat(
            cfg["depths"], cfg["dims"], size, cfg["post_norm"], cfg["layer_scale"], cfg["use_sce"]
        ).eval()
        missing = mirror.load_state_dict(official.state_dict(), strict=False)
    with torch.no_grad():
        out_ours = ours(x, modality=modality)
        out_mirror = mirror(x, modality=modality)
        mirror.fold()
        out_mirror_folded = mirror(x, modality=modality)
    return dict(
        variant=variant,
        modality=modality,
        size=size,
        ours=rel_err(out_ours, ref),
        mirror=rel_err(out_mirror, ref),
        mirror_folded=rel_err(out_mirror_folded, ref),
        mirror_missing=len(missing.missing_keys),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vheat", required=True, help="path to the official classification/models/vHeat.py")
    parser.add_argument("--rsvheat", required=True, help="path to the official models/vHeat/RS_vHeat.py")
    args = parser.parse_args()
    vheat_mod = import_official(args.vheat, "official_vheat")
    rs_mod = import_official(args.rsvheat, "official_rs_vheat")
    torch.manual_seed(0)
    rows = []
    for variant in ("vheat_tiny", "vheat_small", "vheat_base"):
        cfg = rsvheat.VARIANTS[variant]
        official = vheat_mod.vHeat(
            depths=list(cfg["depths"]),
            dims=list(cfg["dims"]),
            post_norm=cfg["post_norm"],
            layer_scale=cfg["layer_scale"],
            img_size=224,
        )
        _randomise(official)
        rows.append(check(official, variant, 224))
    for modality, mode in (("optical", "opt"), ("sar", "sar")):
        cfg = rsvheat.VARIANTS["rsvheat_base"]
        official = rs_mod.RS_vHeat(
            depths=list(cfg["depths"]),
            dims=list(cfg["dims"]),
            post_norm=cfg["post_norm"],
            layer_scale=cfg["layer_scale"],
            img_size=256,
            mode=mode,
        )
        _randomise(official)
        rows.append(check(official, "rsvheat_base", 256, modality))
    print(
        f"{'variant':14s} {'modality':8s} {'size':>4s} {'rel.err ours':>13s} "
        f"{'rel.err mirror':>15s} {'mirror folded':>14s}"
    )
    for r in rows:
        print(
            f"{r['variant']:14s} {r['modality']:8s} {r['size']:4d} {r['ours']:13.2e} {r['mirror']:15.2e} "
            f"{r['mirror_folded']:14.2e}"
        )


def _randomise(model: torch.nn.Module) -> None:
    # Non-trivial norms and layer scales, so that every parameter matters in the comparison.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma1") or name.endswith("gamma2") or "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.05)


if __name__ == "__main__":
    main()
