import json
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F

import rsvheat
from rsvheat.models.checkpoint import CheckpointError, adapt_stem_weight, kt_from_folded, read_weights_file
from rsvheat.operators.heat import heat_filter
from rsvheat.testing.official_structure import OfficialStructureHeat
from tests.conftest import micro_model

MICRO = dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128))


def official(use_sce=True, img_size=64, post_norm=True, layer_scale=1e-5, num_classes=5):
    model = OfficialStructureHeat(
        MICRO["depths"], MICRO["dims"], img_size, post_norm, layer_scale, use_sce, num_classes
    )
    with torch.no_grad():  # non-trivial norms, biases and layer scales so every tensor matters
        for name, p in model.named_parameters():
            if name.endswith(("gamma1", "gamma2")) or ("norm" in name and name.endswith("weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
    return model.eval()


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    ("use_sce", "post_norm", "layer_scale", "modality"),
    [(True, True, 1e-5, "optical"), (True, True, 1e-5, "sar"), (False, False, None, "optical")],
    ids=["rs-vheat-optical", "rs-vheat-sar", "vheat-pre-norm"],
)
def test_official_checkpoint_gives_official_outputs(tmp_path, use_sce, post_norm, layer_scale, modality):
    ref = official(use_sce, post_norm=post_norm, layer_scale=layer_scale)
    torch.save({"model": ref.state_dict(), "epoch": 3}, tmp_path / "official.pth")
    chans = 3 if modality == "optical" else 1
    ours = micro_model(modalities={modality: chans}, use_sce=use_sce, post_norm=post_norm, layer_scale=layer_scale)
    rsvheat.load_checkpoint(ours, tmp_path / "official.pth")
    x = torch.randn(2, chans, 64, 64)
    with torch.no_grad():
        expected = ref(x, modality=modality)
        assert relative_error(ours.eval()(x), expected) <= 1e-5
        assert relative_error(ours.fold((64, 64))(x), ref.fold()(x, modality=modality)) <= 1e-5


def test_checkpoint_made_at_another_resolution_is_resized_bilinearly(tmp_path):
    ref = official(img_size=64)
    torch.save({"model": ref.state_dict()}, tmp_path / "224.pth")
    ours = micro_model(img_size=96)
    rsvheat.load_checkpoint(ours, tmp_path / "224.pth")
    target = official(img_size=96)
    state = ref.state_dict()
    for key, value in state.items():
        if key.startswith(("freq_embed", "heat_capacity")):
            size = target.state_dict()[key].shape[:2]
            state[key] = F.interpolate(value.permute(2, 0, 1)[None], size=size, mode="bilinear", align_corners=False)[
                0
            ].permute(1, 2, 0)
    target.load_state_dict(state)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert relative_error(ours.eval()(x), target(x)) <= 1e-5


def test_pretraining_checkpoint_with_encoder_prefix_and_fusion_module(tmp_path):
    ref = official()
    state = {f"encoder.{k}": v for k, v in ref.state_dict().items() if not k.startswith("classifier")}
    state["fuse_frequency.weight"] = torch.randn(3, 3)
    torch.save({"model": state}, tmp_path / "pretrain.pth")
    ours = micro_model(modalities={"optical": 3, "sar": 1}, num_classes=0)
    result = rsvheat.load_checkpoint(ours, tmp_path / "pretrain.pth")
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(ours.stages[1].heat_capacity, ref.heat_capacity[1])
    torch.testing.assert_close(ours.stems.sar.conv1.weight, ref.patch_embed_sar.conv1.weight)


def test_classification_wrapper_head_wins_over_inner_head(tmp_path):
    ref = official()
    state = {f"encoder.{k}": v for k, v in ref.state_dict().items()}
    outer = torch.randn(5, 128)
    state["classifier.3.weight"] = outer
    state["classifier.3.bias"] = torch.zeros(5)
    torch.save({"model": state}, tmp_path / "cls.pth")
    ours = micro_model()
    rsvheat.load_checkpoint(ours, tmp_path / "cls.pth")
    torch.testing.assert_close(ours.head.fc.weight, outer)


def test_our_safetensors_round_trip_and_metadata(tmp_path):
    model = micro_model(modalities={"optical": 3, "sar": 1}).eval()
    path = rsvheat.save_weights(model, tmp_path / "w.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert '"depths": [1, 1, 2, 1]' in f.metadata()["config"]
    other = micro_model(modalities={"optical": 3, "sar": 1}).eval()
    rsvheat.load_checkpoint(other, path)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x))
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file of the atomic write is gone


def test_model_rebuilt_from_its_weights_file_alone(tmp_path):
    model = micro_model(
        modalities={"optical": 3, "sar": 1, "s2": 12}, img_size=(96, 80), feature_norms=True, layer_scale=0.5
    ).eval()
    model.reset_classifier(7)  # the stored architecture follows the head
    path = rsvheat.save_weights(model, tmp_path / "w.safetensors")
    rebuilt = rsvheat.create_model_from_weights(path).eval()
    assert rebuilt.modalities == model.modalities and rebuilt.img_size == (96, 80) and rebuilt.num_classes == 7
    assert rebuilt.arch_config == model.arch_config
    with torch.no_grad():
        for modality, chans in model.modalities.items():
            x = torch.randn(2, chans, 70, 90)
            torch.testing.assert_close(rebuilt(x, modality), model(x, modality), rtol=0, atol=0)
        x = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(
            rebuilt.forward_intermediates(x, norm=True, intermediates_only=True),
            model.forward_intermediates(x, norm=True, intermediates_only=True),
            rtol=0,
            atol=0,
        )
    # overrides are RSVHeat arguments, adapted as on any load: a backbone without classifier at another size
    backbone = rsvheat.create_model_from_weights(path, num_classes=0, img_size=64)
    assert backbone.num_classes == 0 and backbone.stages[0].freq_embed.shape == (16, 16, 16)
    # a file written before feature_norms was stored: the output norms among its tensors tell
    from safetensors.torch import save_file

    older = {k: v for k, v in model.arch_config.items() if k != "feature_norms"}
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"format": "rsvheat", "config": json.dumps(older)})
    assert rsvheat.create_model_from_weights(tmp_path / "old.safetensors").stages[3].out_norm is not None


def test_only_our_weights_files_say_what_to_build(tmp_path):
    torch.save({"model": official().state_dict()}, tmp_path / "official.pth")
    with pytest.raises(CheckpointError, match=r"official\.pth holds weights without their architecture.*create_model"):
        rsvheat.create_model_from_weights(tmp_path / "official.pth")
    from safetensors.torch import save_file

    save_file(micro_model().state_dict(), str(tmp_path / "plain.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"plain\.safetensors has no rsvheat architecture metadata.*load_checkpoint"
    ):
        rsvheat.create_model_from_weights(tmp_path / "plain.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*broken\.safetensors"):
        rsvheat.create_model_from_weights(tmp_path / "broken.safetensors")


def test_checkpoint_of_another_variant_names_both(tmp_path):
    rsvheat.save_weights(micro_model(), tmp_path / "micro.safetensors")
    with pytest.raises(CheckpointError, match=r"depths \(1, 1, 2, 1\).*model has depths \(2, 2, 6, 2\)"):
        rsvheat.load_checkpoint(timm.create_model("rsvheat_tiny"), tmp_path / "micro.safetensors")
    with pytest.raises(CheckpointError, match=r"RS-vHeat \(with SCE\) but the model is vHeat"):
        rsvheat.load_checkpoint(micro_model(use_sce=False), tmp_path / "micro.safetensors")


def test_unsafe_corrupt_and_missing_files_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_weights_file(tmp_path / "evil.pth")  # weights_only=True
    rsvheat.save_weights(micro_model(), tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        rsvheat.load_checkpoint(micro_model(), tmp_path / "truncated.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        rsvheat.load_checkpoint(micro_model(), tmp_path / "nope.pth")


def test_kt_is_recovered_from_a_folded_filter():
    kt = torch.rand(7, 5, 3) * 2
    kt[0, 0] = 0.0  # DC: no information in the filter
    k_exp = heat_filter(kt)
    recovered = kt_from_folded(k_exp)
    torch.testing.assert_close(recovered[1:], kt[1:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(recovered[0, 1:], kt[0, 1:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(recovered[0, 0], (kt[0, 1] + kt[1, 0]) / 2, rtol=1e-4, atol=1e-4)  # a neighbours' mean
    torch.testing.assert_close(heat_filter(recovered), k_exp, rtol=0, atol=1e-6)
    underflow = kt_from_folded(torch.zeros(2, 2, 1))  # filters that underflowed stay 0, with a finite k·t
    assert torch.isfinite(underflow).all() and heat_filter(underflow)[1:].abs().max() < 1e-30


@pytest.mark.parametrize("use_sce", [True, False], ids=["rs-vheat", "vheat"])
def test_inference_folded_official_checkpoint_loads_as_a_stored_kt(tmp_path, use_sce):
    ref = official(use_sce=use_sce, img_size=224)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = ref.fold()(x)
    # the official infer_init deletes to_k and the FVE: only op.k_exp (and the SCE) remain
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("freq_embed")}
    assert any(k.endswith("op.k_exp") for k in state) and not any(".to_k." in k for k in state)
    torch.save({"model": state}, tmp_path / "folded.pth")
    ours = micro_model(img_size=224, use_sce=use_sce)
    result = rsvheat.load_checkpoint(ours, tmp_path / "folded.pth")
    assert not result.missing_keys and not result.unexpected_keys
    assert ours.stages[2].blocks[1].hco.kt_override.shape == (14, 14, 64)
    with torch.no_grad():
        assert relative_error(ours.eval()(x), expected) <= 1e-5
        assert relative_error(ours.fold((224, 224))(x), expected) <= 1e-5
        other = ours(torch.randn(1, 3, 160, 96))  # the stored k·t is resized like the FVE
    assert other.shape == (1, 5) and torch.isfinite(other).all()
    # our format keeps the stored k·t; a normal checkpoint loaded afterwards removes it again
    rsvheat.save_weights(ours, tmp_path / "folded.safetensors")
    rebuilt = rsvheat.create_model_from_weights(tmp_path / "folded.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), ours(x), rtol=0, atol=0)
    head_only = {k: v for k, v in ours.state_dict().items() if k.startswith("head.")}
    ours.load_state_dict(head_only, strict=False)  # a partial load of other modules keeps the stored k·t
    assert ours.stages[2].blocks[1].hco.kt_override is not None
    torch.save({"model": official(use_sce=use_sce, img_size=224).state_dict()}, tmp_path / "normal.pth")
    rsvheat.load_checkpoint(ours, tmp_path / "normal.pth")
    assert all(block.hco.kt_override is None for stage in ours.stages for block in stage.blocks)


def test_stem_adaptation_rules():
    w = torch.randn(8, 3, 3, 3)
    torch.testing.assert_close(adapt_stem_weight(w, 1), w.sum(1, keepdim=True))
    five = adapt_stem_weight(w, 5)
    torch.testing.assert_close(five[:, 3], w[:, 0] * 3 / 5)
    # with a multiple of the source bands, a constant image gives the pretrained response
    torch.testing.assert_close(adapt_stem_weight(w, 6).sum(1), w.sum(1))
    mapped = adapt_stem_weight(w, 4, band_map=[2, 1, 0, None])
    torch.testing.assert_close(mapped[:, :3], w.flip(1))
    assert mapped[:, 3].eq(0).all()
    with pytest.raises(ValueError, match="band_map has 2 entries, expected one per input band \\(4\\)"):
        adapt_stem_weight(w, 4, band_map=[0, 1])


def test_missing_stems_are_built_from_the_documented_source(tmp_path):
    ref = official()
    torch.save(ref.state_dict(), tmp_path / "rs.pth")
    model = micro_model(modalities={"s2": 4, "s1": 2})
    rsvheat.load_checkpoint(model, tmp_path / "rs.pth", band_maps={"s2": [2, 1, 0, None]})
    torch.testing.assert_close(model.stems.s2.conv1.weight[:, :3], ref.patch_embed_opt.conv1.weight.flip(1))
    # VV/VH from the SAR stem, halved so that VV == VH gives the pretrained SAR response
    torch.testing.assert_close(model.stems.s1.conv1.weight, ref.patch_embed_sar.conv1.weight.repeat(1, 2, 1, 1) / 2)
    torch.testing.assert_close(model.stems.s1.norm2.weight, ref.patch_embed_sar.norm2[1].weight)


def test_timm_loads_a_local_official_file_through_pretrained_cfg_overlay(tmp_path):
    cfg = rsvheat.VARIANTS["rsvheat_tiny"]
    ref = OfficialStructureHeat(cfg["depths"], cfg["dims"], 64, cfg["post_norm"], cfg["layer_scale"], True, 1000)
    torch.save({"model": ref.state_dict()}, tmp_path / "rs_tiny.pth")
    loaded = timm.create_model(
        "rsvheat_tiny", pretrained=True, img_size=64, pretrained_cfg_overlay=dict(file=str(tmp_path / "rs_tiny.pth"))
    )
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(loaded.eval()(x), ref.eval()(x)) <= 1e-5
    features = timm.create_model(
        "rsvheat_tiny",
        pretrained=True,
        img_size=64,
        features_only=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "rs_tiny.pth")),
    )
    torch.testing.assert_close(features.model.stages[2].freq_embed, ref.freq_embed[2])


def _official_file(tmp_path, name: str, img_size: int = 224):
    """An official-format checkpoint (the release files' layout: {"model": ...}, official key names) for a variant."""
    cfg = rsvheat.VARIANTS[name]
    ref = OfficialStructureHeat(
        cfg["depths"], cfg["dims"], img_size, cfg["post_norm"], cfg["layer_scale"], cfg["use_sce"], 1000
    )
    with torch.no_grad():
        for p_name, p in ref.named_parameters():
            if p_name.endswith("bias"):
                p.normal_(0, 0.05)
    path = tmp_path / f"{name}.pth"
    torch.save({"model": ref.state_dict()}, path)
    return ref.eval(), path


def test_vheat_pretrained_cfgs_point_at_the_official_release_files():
    for size in ("tiny", "small", "base"):
        cfg = timm.models.get_pretrained_cfg(f"vheat_{size}")  # the default tag
        assert cfg.url.endswith(f"MzeroMiko/vHeat/releases/download/vheatcls/vHeat_{size}.pth")
        assert (cfg.input_size, cfg.crop_pct, cfg.interpolation, cfg.num_classes) == (
            (3, 224, 224),
            0.875,
            "bicubic",
            1000,
        )
        assert cfg.mean == timm.data.IMAGENET_DEFAULT_MEAN and cfg.std == timm.data.IMAGENET_DEFAULT_STD
        # RS-vHeat: no weights by default; the vHeat ones under an explicit tag
        assert not timm.models.get_pretrained_cfg(f"rsvheat_{size}").has_weights
        assert timm.models.get_pretrained_cfg(f"rsvheat_{size}.vheat_in1k").url == cfg.url


def test_timm_pretrained_vheat_downloads_through_the_converter_offline(tmp_path):
    """``pretrained=True`` runs timm's loader and our converter; a local file stands in for the download."""
    ref, path = _official_file(tmp_path, "vheat_tiny")
    via_timm = timm.create_model("vheat_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    direct = rsvheat.create_model("vheat_tiny")
    rsvheat.load_checkpoint(direct, path)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(via_timm(x), direct.eval()(x), rtol=0, atol=0)
        x224 = torch.randn(1, 3, 224, 224)
        assert relative_error(via_timm(x224), ref(x224)) <= 1e-5
    assert via_timm.pretrained_cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN

    # RS-vHeat from the same vHeat file: the SCE at its initialisation, the SAR stem adapted from the optical one
    torch.manual_seed(0)
    untouched = rsvheat.create_model("rsvheat_tiny", modalities={"optical": 3, "sar": 1})
    torch.manual_seed(0)
    rs = timm.create_model(
        "rsvheat_tiny",
        pretrained=True,
        modalities={"optical": 3, "sar": 1},
        pretrained_cfg_overlay=dict(file=str(path)),
    )
    for i, stage in enumerate(rs.stages):
        torch.testing.assert_close(stage.heat_capacity, untouched.stages[i].heat_capacity, rtol=0, atol=0)
        torch.testing.assert_close(stage.freq_embed, ref.freq_embed[i], rtol=0, atol=0)
        assert stage.blocks[0].hco.sce_norm.weight.eq(1).all() and stage.blocks[0].hco.sce_norm.bias.eq(0).all()
    torch.testing.assert_close(rs.stems.optical.conv1.weight, ref.patch_embed.conv1.weight)
    torch.testing.assert_close(rs.stems.sar.conv1.weight, ref.patch_embed.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(rs.stems.sar.norm1.weight, ref.patch_embed.norm1[1].weight)
    # the same through rsvheat.load_checkpoint
    loaded = rsvheat.create_model("rsvheat_tiny", modalities={"optical": 3, "sar": 1})
    rsvheat.load_checkpoint(loaded, path)
    torch.testing.assert_close(loaded.stems.sar.conv1.weight, rs.stems.sar.conv1.weight)


def test_rsvheat_pretrained_without_a_file_says_what_exists():
    with pytest.raises(RuntimeError, match=r"no pretrained weights are published for rsvheat_base") as info:
        timm.create_model("rsvheat_base", pretrained=True)
    message = str(info.value)
    assert "pretrained_cfg_overlay=dict(file=" in message and "rsvheat.load_checkpoint" in message
    assert "rsvheat_base.vheat_in1k" in message


def test_load_checkpoint_finds_the_backbone_inside_wrappers(tmp_path):
    smp = pytest.importorskip("segmentation_models_pytorch")
    source = timm.create_model("rsvheat_tiny", num_classes=0)
    path = tmp_path / "encoder.safetensors"
    rsvheat.save_weights(source, path)
    expected = source.stages[2].blocks[0].hco.to_k.weight

    features = timm.create_model("rsvheat_tiny", features_only=True)  # timm's feature wrapper, head pruned
    rsvheat.load_checkpoint(features, path, strict=False)
    unet = smp.Unet("tu-rsvheat_tiny", encoder_weights=None, classes=2)  # SMP's timm encoder around the wrapper
    rsvheat.load_checkpoint(unet, path, strict=False)
    for wrapped in (features, unet):
        (backbone,) = [m for m in wrapped.modules() if isinstance(m, rsvheat.RSVHeat)]
        assert torch.equal(backbone.stages[2].blocks[0].hco.to_k.weight, expected)

    with pytest.raises(CheckpointError, match="ModuleList holds 2 RS-vHeat/vHeat backbones"):
        rsvheat.load_checkpoint(torch.nn.ModuleList([source, features]), path)
    with pytest.raises(CheckpointError, match="Linear holds no RS-vHeat/vHeat backbone"):
        rsvheat.load_checkpoint(torch.nn.Linear(2, 2), path)
