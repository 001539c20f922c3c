import json
import pickle

import pytest
import timm
import torch
import torch.nn.functional as F

import rsvheat
from rsvheat.models.checkpoint import CheckpointError, adapt_stem_weight, read_checkpoint
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
        read_checkpoint(tmp_path / "evil.pth")  # weights_only=True
    rsvheat.save_weights(micro_model(), tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.safetensors"):
        rsvheat.load_checkpoint(micro_model(), tmp_path / "truncated.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        rsvheat.load_checkpoint(micro_model(), tmp_path / "nope.pth")


def test_inference_folded_official_checkpoint_is_explained(tmp_path):
    ref = official().fold()
    torch.save({"model": ref.state_dict()}, tmp_path / "folded.pth")
    with pytest.raises(CheckpointError, match="inference-folded"):
        rsvheat.load_checkpoint(micro_model(), tmp_path / "folded.pth")


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
