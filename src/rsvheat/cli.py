"""The ``rsvheat`` command line: ``demo``, ``info``, ``bench``, ``pretrain``, ``export-encoder``, and the downstream
tasks' ``fit``, ``validate``, ``test``, ``predict``.

Errors a user can fix (a missing or unreadable file, an existing output, a bad option value: ``ValueError`` and its
subclasses ``ImageReadError``/``CheckpointError``, ``OSError`` such as ``FileNotFoundError``/``FileExistsError``/a
full disk) end the commands implemented here with one line, ``rsvheat <command>: error: <message>``, and exit
status 2; ``RSVHEAT_DEBUG=1`` shows the traceback instead. The Lightning commands (``pretrain`` and the tasks') keep
LightningCLI's own reporting.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from rsvheat import STRIDE, arguments

TASK_COMMANDS = ("fit", "validate", "test", "predict")


def _info(args: argparse.Namespace) -> None:
    import torch

    import rsvheat
    from rsvheat.models.counting import count

    with torch.device("meta"):  # shapes only: counting at 2048² allocates nothing
        model = rsvheat.create_model(args.model, num_classes=args.num_classes, img_size=args.img_size)
    c = count(model, args.img_size, args.model)
    print(f"{args.model} at {args.img_size}x{args.img_size}:")
    print(
        f"  params  train {c.params_train / 1e6:8.2f} M   folded (paper) {c.params_folded / 1e6:8.2f} M   "
        f"folded + SCE (runtime) {c.params_folded_runtime / 1e6:8.2f} M"
    )
    print(f"  GMACs   train {c.gmacs_train:8.2f}     folded (paper) {c.gmacs_folded:8.2f}")


def _explain(args: argparse.Namespace) -> None:
    import rsvheat
    from rsvheat.data.io import image_header
    from rsvheat.explain import colour_bands, explain_scene

    stats, learned = None, True
    # an alpha band is the valid-pixel mask, not a band of the stem, unless the user selects bands
    bands = args.bands or colour_bands(args.image)
    if bands and not args.bands:
        print(f"{args.image}: its alpha band is read as the valid-pixel mask (bands {','.join(map(str, bands))} used)")
    if args.checkpoint is not None:
        from rsvheat.inference.tasks import load_task

        task, meta = load_task(args.checkpoint)
        model, stats = task.backbone, (meta["stats"] or {}).get(args.modality)  # TorchGeo stores none
        weights = f"weights: checkpoint {args.checkpoint.name}"
    else:
        channels = args.channels or (len(bands) if bands else image_header(args.image)[0])
        model = rsvheat.create_model(args.model, modalities={args.modality: channels})
        if args.weights is not None and Path(args.weights).is_file():
            missing = rsvheat.load_checkpoint(model, args.weights, strict=False).missing_keys
            weights = f"weights: {args.model} from {Path(args.weights).name}"
            if missing:
                print(f"warning: {len(missing)} tensors not in {args.weights} kept at random init, e.g. {missing[0]}")
                weights += f" ({len(missing)} tensors at random init)"
        elif args.weights is not None:
            from rsvheat.models.weights import load_weights, weights_label

            load_weights(model, args.weights)  # a known name (or a missing file: the error lists the names)
            weights = f"weights: {args.model} from {weights_label(args.weights)}"
        else:
            weights, learned = f"weights: {args.model}, random initialisation: not learned", False
    written = explain_scene(
        model,
        args.image,
        args.out,
        args.modality,
        stats,
        bands,
        args.tile,
        overwrite=args.overwrite,
        weights=weights,
        learned=learned,
        precision=args.precision,
    )
    print(f"heat maps written to {args.out} ({len(written)} figures; overview: {written['summary']})")


#: Image sizes: at least the backbone's stride.
_SIZE = arguments.at_least(STRIDE)
_COUNT = arguments.at_least(1)
#: Weight names besides paths (rsvheat.models.weights.NAMED_WEIGHTS, spelled here so that --help imports no torch).
_NAMES = "vheat_tiny, vheat_small, vheat_base (official vHeat ImageNet-1k, downloaded once)"


#: Old spellings that still work but are not shown in --help (predict-scene's -o/--output became -o/--out).
_HIDDEN_ALIASES = ("--output",)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Epilogs (the examples) printed as written; the hidden aliases left out of the option list."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if any(o in _HIDDEN_ALIASES for o in action.option_strings):
            action = copy.copy(action)
            action.option_strings = [o for o in action.option_strings if o not in _HIDDEN_ALIASES]
        return super()._format_action_invocation(action)


def _command(sub, name: str, help: str, examples: str) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with ``examples`` (one command per line, with a comment where useful)."""
    return sub.add_parser(
        name, help=help, description=help, epilog="examples:\n" + examples, formatter_class=_Formatter
    )


def _add_out(
    parser: argparse.ArgumentParser, help: str, default: Path | None = None, positional_alias: bool = False
) -> None:
    """The output option, ``-o/--out`` in every command. ``positional_alias``: the command used to take its output as a
    positional argument; that spelling still works (hidden from --help), resolved by :func:`_resolve_out`."""
    parser.add_argument(
        "-o",
        "--out",
        type=Path,
        default=None,
        required=default is None and not positional_alias,
        help=help if default is None else f"{help} (default {default})",
    )
    if positional_alias:
        parser.add_argument("legacy_out", type=Path, nargs="?", default=None, help=argparse.SUPPRESS)
        parser.set_defaults(out_default=default, out_parser=parser)
    elif default is not None:
        parser.set_defaults(out=default)


def _resolve_out(args: argparse.Namespace) -> None:
    """``-o/--out`` or, for the commands that took it so, the old positional output; one of them, at most once."""
    if not hasattr(args, "legacy_out"):
        return
    parser, given = args.out_parser, [p for p in (args.out, args.legacy_out) if p is not None]
    if len(given) == 2:
        parser.error("give the output once, as -o/--out")
    args.out = given[0] if given else args.out_default
    if args.out is None:
        parser.error("the following arguments are required: -o/--out")


def _demo(args: argparse.Namespace) -> None:
    from rsvheat.apps.demo import run_demo

    run_demo(
        args.out,
        args.image,
        args.model,
        args.weights,
        args.bench_size,
        args.train_root,
        args.num_classes,
        args.pretrain_steps,
        args.epochs,
        overwrite=args.overwrite,
    )


def _make_samples(args: argparse.Namespace) -> None:
    from rsvheat.apps.samples import write_all

    for task, path in write_all(args.out, overwrite=args.overwrite).items():
        print(f"{task:15s} {path}")


def _predict_scene(args: argparse.Namespace) -> None:
    from rsvheat.inference.tasks import predict_scene

    probabilities = arguments.probabilities_beside(args.out) if args.probabilities is True else args.probabilities
    written = predict_scene(
        args.checkpoint,
        args.images,
        args.out,
        probabilities=probabilities,
        bands=args.bands,
        tile=args.tile,
        overlap=args.tile // 4 if args.overlap is None else args.overlap,
        batch_size=args.batch_size,
        device=args.device,
        overwrite=args.overwrite,
        cog=not args.no_cog,
        precision=args.precision,
        score_threshold=args.score_threshold,
        compile=args.compile,
        normalisation=arguments.normalisation(args),
    )
    print("written:", *written, sep="\n  ")


def _export(args: argparse.Namespace) -> None:
    from rsvheat.export import export_checkpoint

    result = export_checkpoint(
        args.out,
        args.size,
        args.checkpoint,
        args.model,
        args.weights,
        args.channels,
        overwrite=args.overwrite,
        tolerance=args.tolerance,
    )
    print(
        f"{result['path']}: max |exported - PyTorch| = {result['max_abs_diff']:.2e} "
        f"(outputs up to {result['reference_max_abs']:.2f}; relative {result['relative_diff']:.1e})"
    )


def _export_encoder(args: argparse.Namespace) -> None:
    from rsvheat.trainers.pretrain import export_encoder

    print(f"encoder weights written to {export_encoder(args.checkpoint, args.out, args.overwrite)}")


#: Other tools' Lightning command lines that ``rsvheat <tool> ...`` runs with rsvheat's models registered with timm:
#: tool -> (module, function, install hint). Neither TorchGeo, TerraTorch nor timm loads plugins through entry points,
#: so ``model: rsvheat_tiny`` in their configs is "Unknown model" unless something imports rsvheat first.
EXTERNAL_CLIS = {
    "torchgeo": ("torchgeo.main", "main", "pip install 'rsvheat[integrations]'"),
    "terratorch": ("terratorch.__main__", "main", "pip install terratorch"),
}
#: What --help prints before the tool's own help: how rsvheat's models are named there.
_EXTERNAL_EXAMPLES = {
    "torchgeo": "  rsvheat torchgeo fit --config x.yaml   # ClassificationTask model: rsvheat_tiny, or backbone: "
    "tu-rsvheat_tiny",
    "terratorch": "  rsvheat terratorch fit --config y.yaml # EncoderDecoderFactory backbone: timm_rsvheat_tiny",
}


def run_external_cli(tool: str, argv: list[str]) -> None:
    """Run ``tool``'s own command line (``torchgeo`` or ``terratorch``) on ``argv`` with rsvheat's models known to timm
    (``rsvheat_*``, ``vheat_*``; ``tu-rsvheat_*`` in SMP, ``timm_rsvheat_*`` in TerraTorch's backbone registry)."""
    import importlib

    module_name, function, hint = EXTERNAL_CLIS[tool]
    importlib.import_module("rsvheat.models")  # imports timm and registers the models
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] != tool:
            raise
        raise ValueError(f"{tool} is not installed in this environment ({hint})") from None
    if tool == "torchgeo":  # a config may then name rsvheat's weights: weights: RSVHeatWeights.VHEAT_TINY_IN1K
        importlib.import_module("rsvheat.models.torchgeo_weights")
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(f"rsvheat {tool}: {tool}'s own command line, with rsvheat's models registered.\nexamples:")
        print(_EXTERNAL_EXAMPLES[tool] + "\n", flush=True)
    # The tool reads sys.argv itself (passing argv as LightningCLI's args would make it warn); its usage lines then
    # show the command as typed.
    saved_argv, data_base = sys.argv, getattr(module, "BaseDataModule", None)
    sys.argv = [f"rsvheat {tool}", *argv]
    if data_base is not None:
        # TorchGeo's main builds its LightningCLI with BaseDataModule as the data base class, read from its module at
        # call time: widened to any Lightning data module, rsvheat's (same sample dicts) are accepted too
        from lightning.pytorch import LightningDataModule

        setattr(module, "BaseDataModule", LightningDataModule)  # noqa: B010 (the module's type does not declare it)
    try:
        getattr(module, function)()
    finally:
        sys.argv = saved_argv
        if data_base is not None:
            setattr(module, "BaseDataModule", data_base)  # noqa: B010


def _add_demo(sub) -> None:
    demo = _command(
        sub,
        "demo",
        "the whole pipeline on a real scene: pre-train, fine-tune, whole-scene map, heat maps, report",
        "  rsvheat demo                                    # the embedded Landsat scene, into outputs/demo\n"
        "  rsvheat demo --image scene.tif -o outputs/mine  # your GeoTIFF\n"
        "  rsvheat demo --train-root data/seg --num-classes 6 --weights encoder.safetensors",
    )
    _add_out(demo, "output folder", Path("outputs/demo"))
    demo.add_argument("--image", type=Path, default=None, help="a GeoTIFF of your own instead of the embedded scene")
    demo.add_argument("--train-root", type=Path, default=None, help="your segmentation data (train/, val/ folders)")
    demo.add_argument("--num-classes", type=arguments.at_least(2), default=None, help="classes of --train-root")
    demo.add_argument("--model", default="rsvheat_tiny", help="backbone variant (default rsvheat_tiny)")
    demo.add_argument("--weights", type=Path, default=None, help="an encoder to fine-tune instead of pre-training")
    demo.add_argument("--pretrain-steps", type=_COUNT, default=120, help="pre-training steps (default 120)")
    demo.add_argument("--epochs", type=_COUNT, default=12, help="fine-tuning epochs (default 12)")
    demo.add_argument("--bench-size", type=_SIZE, default=512, help="image size of the speed comparison")
    demo.add_argument(
        "--overwrite",
        action="store_true",
        help="use a non-empty --out that is not an earlier demo's folder (its data/, configs/, pretrain/, finetune/, "
        "scene/, heat_maps/ are replaced)",
    )
    demo.set_defaults(handler=_demo)


def _add_info_and_samples(sub) -> None:
    info = _command(
        sub,
        "info",
        "parameters and GMACs of a variant in both counting conventions",
        "  rsvheat info --model rsvheat_base --img-size 512",
    )
    info.add_argument("--model", default="rsvheat_base", help="backbone variant (default rsvheat_base)")
    info.add_argument("--img-size", type=_SIZE, default=224, help="input side in pixels (default 224)")
    info.add_argument(
        "--num-classes",
        type=arguments.at_least(0),
        default=0,
        help="classifier outputs counted (default 0: backbone only)",
    )
    info.set_defaults(handler=_info)
    samples = _command(
        sub,
        "make-samples",
        "write small task datasets cut from the embedded Landsat scene",
        "  rsvheat make-samples -o data/samples",
    )
    _add_out(samples, "output folder", Path("data/samples"), positional_alias=True)
    samples.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty folder that make-samples did not write (its classification/, segmentation/, "
        "change/, detection/ subfolders are replaced; nothing else is touched)",
    )
    samples.set_defaults(handler=_make_samples)


def _add_predict_scene(sub) -> None:
    scene = _command(
        sub,
        "predict-scene",
        "run a fine-tuned checkpoint over whole GeoTIFF scenes (tiled, bounded memory, georeferenced output)",
        "  rsvheat predict-scene --checkpoint runs/seg/checkpoints/best.ckpt scene.tif -o classes.tif --probabilities\n"
        "  rsvheat predict-scene --checkpoint runs/cd/checkpoints/best.ckpt before.tif after.tif -o change.tif\n"
        "  rsvheat predict-scene --checkpoint runs/det/checkpoints/best.ckpt scene.tif -o boxes.geojson",
    )
    arguments.add_checkpoint(
        scene, "a `rsvheat fit` checkpoint (e.g. runs/.../checkpoints/best.ckpt)", positional_alias="images"
    )
    scene.add_argument(
        "images",
        type=Path,
        nargs="+",
        help="segmentation: one raster per stem (optical [sar]); change detection: before after; detection: one",
    )
    # -o/--output before -o/--out: the old spelling still works (a hidden alias)
    scene.add_argument(
        "-o", "--out", "--output", type=Path, required=True, help="class/change map .tif, or boxes .geojson"
    )
    scene.add_argument(
        "--probabilities",
        type=Path,
        nargs="?",
        const=True,
        default=None,
        help="also write per-class probabilities: to <map stem>.probabilities.tif, or to the .tif given",
    )
    arguments.add_mapping(scene, "auto (CUDA when present), cpu, cuda, cuda:1, ...")
    scene.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    scene.set_defaults(handler=_predict_scene)


def _add_explain(sub) -> None:
    explain = _command(
        sub,
        "explain",
        "heat maps: how each HCO diffuses the features of an image (PNGs)",
        "  rsvheat explain scene.tif -o outputs/explain --weights vheat_tiny\n"
        "  rsvheat explain scene.tif --checkpoint runs/seg/checkpoints/best.ckpt --bands 3,2,1",
    )
    explain.add_argument("image", type=Path, help="a raster (GeoTIFF, PNG, ...) of any size")
    _add_out(explain, "output folder", Path("outputs/explain"))
    explain.add_argument("--modality", default="optical", help="the stem to run the image through (optical, sar)")
    arguments.add_checkpoint(explain, "a `rsvheat fit` task checkpoint", required=False)
    explain.add_argument("--weights", default=None, help=f"or backbone weights: a file or {_NAMES}")
    explain.add_argument("--model", default="rsvheat_tiny", help="variant for --weights or random init")
    explain.add_argument("--channels", type=_COUNT, default=None, help="bands of the stem (default: the image's)")
    explain.add_argument(
        "--bands",
        type=arguments.bands,
        default=None,
        help="1-based bands to read, e.g. 4,3,2 (default: all but an alpha band)",
    )
    explain.add_argument("--tile", type=_SIZE, default=1024, help="scenes larger than this are explained per tile")
    explain.add_argument("--overwrite", action="store_true", help="replace the heat maps in a non-empty --out")
    arguments.add_precision(explain)
    explain.set_defaults(handler=_explain)


def _add_export(sub) -> None:
    onnx = _command(
        sub,
        "export",
        "export a folded backbone or a task model to ONNX (.onnx) or torch.export (.pt2)",
        "  rsvheat export -o segmenter.onnx --checkpoint runs/seg/checkpoints/best.ckpt --size 512\n"
        "  rsvheat export -o rsvheat_tiny.pt2 --model rsvheat_tiny --weights vheat_tiny --size 512 768",
    )
    _add_out(onnx, "output file: .onnx (checked with ONNX Runtime) or .pt2", positional_alias=True)
    onnx.add_argument("--size", type=_SIZE, nargs="+", default=[512], help="input H [W] the graph is folded for")
    arguments.add_checkpoint(onnx, "a `rsvheat fit` task checkpoint", required=False)
    onnx.add_argument("--model", default="rsvheat_tiny", help="backbone variant when no checkpoint is given")
    onnx.add_argument("--weights", default=None, help=f"backbone weights: a file (.safetensors, .pth) or {_NAMES}")
    onnx.add_argument("--channels", type=_COUNT, default=3, help="input bands of the backbone variant")
    onnx.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    onnx.add_argument(
        "--tolerance",
        type=arguments.at_least(0.0, float),
        default=1e-3,
        help="largest accepted max |exported - PyTorch| / max |PyTorch| (default 1e-3); above it nothing is written",
    )
    onnx.set_defaults(handler=_export)
    encoder = _command(
        sub,
        "export-encoder",
        "write the encoder of a pre-training checkpoint as .safetensors",
        "  rsvheat export-encoder --checkpoint runs/pretrain/checkpoints/last.ckpt -o encoder.safetensors",
    )
    arguments.add_checkpoint(
        encoder, "Lightning checkpoint of `rsvheat pretrain` (e.g. last.ckpt)", positional_alias="legacy_out"
    )
    _add_out(encoder, "output .safetensors file", positional_alias=True)
    encoder.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    encoder.set_defaults(handler=_export_encoder)


def build_parser() -> argparse.ArgumentParser:
    """The ``rsvheat`` parser; each subcommand's ``handler`` runs it. The Lightning commands (``pretrain``, the
    tasks') and ``bench`` only appear for ``--help``: their own parsers read their arguments."""
    parser = argparse.ArgumentParser(
        prog="rsvheat",
        description="RS-vHeat: heat-conduction remote-sensing backbone",
        formatter_class=_Formatter,
        epilog=(
            "examples:\n"
            "  rsvheat demo\n"
            "  rsvheat fit --config configs/segmentation/landsat_tiny_cpu.yaml\n"
            "  rsvheat predict-scene --checkpoint runs/seg/checkpoints/best.ckpt scene.tif -o classes.tif\n"
            "  rsvheat torchgeo fit --config torchgeo.yaml\n"
            "options: -o/--out for outputs, --checkpoint for a trained model, --dashed-names and --model for the\n"
            "backbone in these commands; the Lightning commands keep Lightning's spelling: --model.backbone (tasks),\n"
            "--model.variant (pretrain), --ckpt_path (their --checkpoint.* configures the checkpoint callback)."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_info_and_samples(sub)
    sub.add_parser("bench", help="efficiency benchmark vs Swin / ViT / official structure (see --help)", add_help=False)
    sub.add_parser("pretrain", help="self-supervised pre-training (LightningCLI: --config, see --help)", add_help=False)
    for command in TASK_COMMANDS:
        sub.add_parser(command, help=f"downstream tasks: {command} (--config, see --help)", add_help=False)
    for tool in EXTERNAL_CLIS:
        sub.add_parser(
            tool,
            help=f"{tool}'s own command line with rsvheat's models registered (e.g. fit --config x.yaml)",
            add_help=False,
        )
    _add_predict_scene(sub)
    # passed through like bench: building its parser imports torch, which `rsvheat --help` must not pay for
    sub.add_parser(
        "predict-scenes",
        help="map many scenes with a fine-tuned checkpoint over processes, GPUs and nodes (see --help)",
        add_help=False,
    )
    _add_explain(sub)
    _add_export(sub)
    return parser


#: The commands whose own parsers read their arguments: ``module:function``, imported when run (inside the guard, so
#: that a missing optional package is named with the extra that installs it).
PASSTHROUGH = {
    "bench": "rsvheat.apps.bench:main",
    "predict-scenes": "rsvheat.inference.batch:run",
    "pretrain": "rsvheat.trainers.pretrain:pretrain_cli",
}


def _imported(target: str) -> Callable:
    def run(*args):
        module, name = target.split(":")
        return getattr(importlib.import_module(module), name)(*args)

    return run


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TASK_COMMANDS:
        arguments.guarded(argv[0], _imported("rsvheat.trainers.cli:task_cli"), argv)
        return
    if argv and argv[0] in EXTERNAL_CLIS:
        arguments.guarded(argv[0], run_external_cli, argv[0], argv[1:])
        return
    if argv and argv[0] in PASSTHROUGH:
        arguments.guarded(argv[0], _imported(PASSTHROUGH[argv[0]]), argv[1:])
        return
    args = build_parser().parse_args(argv)
    if hasattr(args, "checkpoint_required"):  # before the output: export-encoder's old positionals are both
        arguments.resolve_checkpoint(args)
    _resolve_out(args)
    arguments.guarded(args.command, args.handler, args)


if __name__ == "__main__":
    main()
