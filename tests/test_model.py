import pytest
import timm
import torch
import torch.nn.functional as F

import rsvheat
from rsvheat.models.counting import kernel_counts
from rsvheat.models.rsvheat import Mlp, resize_embedding
from tests.conftest import micro_model


@pytest.mark.smoke
@pytest.mark.parametrize("size", [(64, 64), (65, 97), (32, 200), (100, 33)])
def test_any_input_size_including_non_multiples_of_32(size):
    model = micro_model().eval()
    x = torch.randn(2, 3, *size)
    feats = model.forward_intermediates(x, intermediates_only=True)
    h, w = size
    for i, f in enumerate(feats):
        h, w = (-(-h // 4), -(-w // 4)) if i == 0 else (-(-h // 2), -(-w // 2))
        assert f.shape == (2, model.dims[i], h, w)
    assert model(x).shape == (2, 5)
    assert model.forward_features(x).shape == feats[-1].shape


def test_forward_intermediates_contract():
    model = micro_model(feature_norms=True).eval()
    x = torch.randn(1, 3, 64, 64)
    final, feats = model.forward_intermediates(x, indices=[1, 3], norm=True)
    assert [f.shape[1] for f in feats] == [32, 128]
    torch.testing.assert_close(final, model.forward_features(x))
    nhwc = model.forward_intermediates(x, indices=2, output_fmt="NHWC", intermediates_only=True)
    assert [f.shape[-1] for f in nhwc] == [64, 128]
    with pytest.raises(ValueError, match="feature_norms=True"):
        micro_model().forward_intermediates(x, norm=True)


def test_folded_inference_equals_unfolded_and_is_reused():
    model = micro_model()
    x = torch.randn(2, 3, 80, 72)
    model.eval()
    with torch.no_grad():
        reference = model(x)  # eval mode, not folded: computed from the weights
    assert model.stages[2].folded_fve is None and model.stages[2].blocks[0].hco.folded_filter is None
    model.fold((80, 72))
    stage = model.stages[2]
    fve, filt = stage.folded_fve, stage.blocks[0].hco.folded_filter
    assert fve.shape == (5, 5, 64) and filt.shape == (5, 5, 64)
    with torch.inference_mode():
        folded = model(x)
    # fold() already built what the forward used
    assert stage.folded_fve is fve and stage.blocks[0].hco.folded_filter is filt
    torch.testing.assert_close(folded, reference, rtol=0, atol=0)
    with torch.no_grad():  # another size folds on first use in folded mode, still equal
        small = model(x[..., :40, :48])
        assert stage.folded_fve.shape == (3, 3, 64)
        torch.testing.assert_close(small, model.unfold()(x[..., :40, :48]), rtol=0, atol=0)
    assert not dict(model.named_buffers())


def test_folded_tensors_are_buffers_outside_the_state_dict_and_unfold_drops_them():
    model = micro_model().fold((64, 64))
    buffers = dict(model.named_buffers())
    folded = {"stages.0.folded_fve", "stages.0.folded_sce", "stages.3.blocks.0.hco.folded_filter"}
    assert folded | {"stages.3.blocks.0.folded_affine"} <= buffers.keys()
    # at the stored size the folded FVE is a copy, never the parameter itself
    assert buffers["stages.0.folded_fve"].data_ptr() != model.stages[0].freq_embed.data_ptr()
    assert not any("folded" in key for key in model.state_dict())
    model.unfold()
    assert not dict(model.named_buffers()) and not any(stage.folding for stage in model.stages)
    model.fold((64, 64)).train()  # training changes the weights: train() ends the fold
    assert not dict(model.named_buffers()) and not any(stage.folding for stage in model.stages)


def test_each_mode_follows_the_weights_it_promises_to():
    """Not folded (training, eval, under autograd or not): computed from the weights at every forward. Folded: computed
    once per size, until train() or unfold(); a load_state_dict folds again from the loaded weights (also under
    Lightning's ``torch.inference_mode``, where the resized FVE is an inference tensor)."""
    model = micro_model().eval()
    x = torch.randn(1, 3, 72, 56)
    with torch.inference_mode():
        before = model(x)
    with torch.no_grad():
        for stage in model.stages:
            stage.freq_embed.mul_(3.0)
    with torch.inference_mode():
        changed = model(x)  # eval mode without a fold: the edit is seen at once
    assert not torch.equal(changed, before)
    torch.testing.assert_close(model.fold()(x).detach(), changed, rtol=0, atol=0)
    other = micro_model().eval()
    with torch.no_grad():
        expected = other(x)
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert all(stage.folding for stage in model.stages)  # still folded mode, folded from the loaded weights


@pytest.mark.smoke
def test_gradients_reach_fve_sce_to_k_and_stems():
    model = micro_model(modalities={"optical": 3, "sar": 1})
    loss = (
        model(torch.randn(2, 3, 64, 64), modality="optical").logsumexp(1).mean()
        + model(torch.randn(2, 1, 64, 64), modality="sar").logsumexp(1).mean()
    )
    loss.backward()
    for name in [
        "stages.0.freq_embed",
        "stages.3.heat_capacity",
        "stages.2.blocks.1.hco.to_k.weight",
        "stems.optical.conv1.weight",
        "stems.sar.conv1.weight",
        "stages.1.blocks.0.hco.sce_norm.weight",
    ]:
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_embeddings_are_resized_bilinearly_to_the_feature_map():
    model = micro_model().eval()
    fve, sce = model.stages[0].embeddings((20, 30))
    expected = F.interpolate(
        model.stages[0].freq_embed.permute(2, 0, 1)[None], size=(20, 30), mode="bilinear", align_corners=False
    )[0].permute(1, 2, 0)
    torch.testing.assert_close(fve, expected)
    assert sce.shape == (20, 30, 16)
    assert resize_embedding(model.stages[0].freq_embed, (16, 16)) is model.stages[0].freq_embed


def test_multiple_stems_share_one_heat_space():
    model = micro_model(modalities={"optical": 3, "sar": 1, "s2": 12, "s1": 2}).eval()
    for name, chans in model.modalities.items():
        assert model(torch.randn(1, chans, 64, 64)).shape == (1, 5), name  # inferred from the channel count
    assert model(torch.randn(1, 3, 64, 64), modality="optical").shape == (1, 5)


@pytest.mark.parametrize(
    ("x", "kwargs", "message"),
    [
        (torch.randn(1, 4, 64, 64), {}, r"'optical' stem expects 3 input channels, got 4"),
        (torch.randn(3, 64, 64), {}, r"expected a 4-D \(B, C, H, W\) tensor, got 3-D"),
        (torch.randn(1, 3, 64, 64), {"modality": "lidar"}, r"unknown modality 'lidar'.*\['optical'\]"),
        (torch.randn(1, 3, 16, 64), {}, r"smaller than the model's stride 32"),
    ],
)
def test_bad_input_is_named(x, kwargs, message):
    with pytest.raises(ValueError, match=message):
        micro_model()(x, **kwargs)


def test_nan_input_is_rejected_when_checking_is_on():
    x = torch.randn(1, 3, 64, 64)
    x[0, 1, 5, 5] = float("nan")
    assert torch.isnan(micro_model()(x)).any()  # off by default: no extra pass
    with pytest.raises(ValueError, match="NaN or Inf"):
        micro_model(check_inputs=True)(x)


def test_output_stride_other_than_32_is_refused():
    with pytest.raises(ValueError, match="output_stride=16"):
        micro_model(output_stride=16)


@pytest.mark.parametrize("name", sorted(rsvheat.VARIANTS))
def test_every_variant_is_registered_with_timm(name):
    model = timm.create_model(name, num_classes=3)
    assert model.num_classes == 3
    assert model.use_sce == name.startswith("rsvheat")
    assert model.depths == rsvheat.VARIANTS[name]["depths"]


def test_pre_norm_and_post_norm_blocks_differ():
    x = torch.randn(1, 3, 64, 64)
    torch.manual_seed(1)
    pre = micro_model(post_norm=False, layer_scale=None).eval()
    torch.manual_seed(1)
    post = micro_model(post_norm=True, layer_scale=None).eval()
    assert not torch.allclose(pre(x), post(x))


@pytest.mark.smoke
def test_tiny_model_overfits_a_tiny_set():
    torch.manual_seed(0)
    model = micro_model(num_classes=4, drop_path_rate=0.1)
    x = torch.randn(8, 3, 64, 64)
    y = torch.arange(8) % 4
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(40):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).all()
    assert loss.item() < 0.1


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 3, 64, 64)
    model = micro_model()
    model(x).square().mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("post_norm", [True, False])
def test_checkpointing_gives_the_plain_gradients_of_every_parameter_in_float64(post_norm):
    # float64 and odd sides (padding in the stem and downsamplings); drop path on: its masks must be replayed
    torch.manual_seed(0)
    model = micro_model(post_norm=post_norm, layer_scale=1e-5 if post_norm else None, drop_path_rate=0.2).double()
    x = torch.randn(2, 3, 45, 39, dtype=torch.float64)
    grads = {}
    for mode in (False, True, 3):  # 3: the first three of the five blocks, a stage boundary inside the setting
        model.set_grad_checkpointing(bool(mode), blocks=None if isinstance(mode, bool) else mode)
        model.zero_grad()
        torch.manual_seed(1)  # the same drop-path masks in every mode
        model(x).square().mean().backward()
        grads[mode] = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads[False].values())
    for name, expected in grads[False].items():
        torch.testing.assert_close(grads[True][name], expected, rtol=1e-12, atol=1e-15, msg=name)
        torch.testing.assert_close(grads[3][name], expected, rtol=1e-12, atol=1e-15, msg=name)
    assert [stage.recomputed_blocks for stage in model.stages] == [1, 1, 1, 0]
    with pytest.raises(ValueError, match="blocks must be >= 0 or None, got -1"):
        model.set_grad_checkpointing(True, blocks=-1)


def test_reset_classifier_and_head():
    model = micro_model()
    model.reset_classifier(0)
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 128)
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 128)
    assert "stages.0.freq_embed" in model.no_weight_decay()
    model.reset_classifier(5, global_pool="")  # per-position logits, NCHW like forward_features
    features = model.forward_features(x)
    assert model(x).shape == (2, 5, *features.shape[-2:])
    assert torch.allclose(
        model(x).mean((2, 3)), model.head.fc(model.forward_head(features, pre_logits=True).mean((2, 3)))
    )


def test_mlp_chunks_rows_on_cpu_only():
    mlp = Mlp(8, 32)
    mlp.chunk_elements = 32 * 10  # 10 rows per chunk: 63 rows make 7 chunks
    x = torch.randn(1, 7, 9, 8)
    with torch.inference_mode():
        whole = mlp.fc2(F.gelu(mlp.fc1(x)))
        torch.testing.assert_close(mlp(x), whole)
        assert kernel_counts(lambda: mlp(x))["addmm"] == 2 * 7
        # elsewhere (a GPU; the meta device here) the caching allocator recycles buffers: two GEMMs, not fourteen
        meta, x = mlp.to("meta"), x.to("meta")
        assert kernel_counts(lambda: meta(x))["addmm"] == 2
