"""Pre-training model and losses: exact against float64 references, zero on perfect reconstruction, gradients, ablation
switches, odd sizes, and learning."""

import math

import numpy as np
import pytest
import torch
from scipy.fft import dctn

from rsvheat.pretraining.model import FrequencyPretrainer, frequency_loss, info_nce, queue_nce, spatial_loss

MICRO = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64), "drop_path_rate": 0.0}


def micro_pretrainer(**kwargs) -> FrequencyPretrainer:
    """A micro model with every term on (the full objective), unless ``loss_weights`` switches some off."""
    weights = {"spa": 1.0, "fre": 1.0, "con": 1.0, **kwargs.pop("loss_weights", {})}
    cfg = dict(variant="rsvheat_tiny", img_size=64, decoder_width=16, proj_dim=8, encoder_kwargs=MICRO)
    return FrequencyPretrainer(**{**cfg, "loss_weights": weights, **kwargs})


def test_reconstruction_losses_match_float64_reference():
    x, y = torch.randn(2, 3, 20, 28), torch.randn(2, 3, 20, 28)
    ref_fre = np.abs(
        dctn(x.double().numpy(), axes=(-2, -1), norm="ortho") - dctn(y.double().numpy(), axes=(-2, -1), norm="ortho")
    ).mean()
    assert frequency_loss(x, y).item() == pytest.approx(ref_fre, rel=1e-5)
    assert spatial_loss(x, y).item() == pytest.approx((x - y).abs().double().mean().item(), rel=1e-6)
    assert spatial_loss(x, x).item() == 0.0 and frequency_loss(x, x).item() == pytest.approx(0.0, abs=1e-7)


def test_info_nce():
    aligned = torch.eye(4, 16) * 10
    assert info_nce(aligned, aligned, temperature=0.01).item() == pytest.approx(0.0, abs=1e-6)
    swapped = info_nce(aligned, aligned.roll(1, 0), temperature=0.01).item()
    assert swapped > 10  # every positive is orthogonal, a negative is identical
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert info_nce(a, b).item() == pytest.approx(1.0)  # batch of one: 1 - cos
    assert info_nce(a, a).item() == pytest.approx(0.0)
    # both sides collapsed onto one direction: chance level exactly, and no gradient to leave it (the dead point)
    same = torch.ones(5, 3)
    other = (torch.rand(5, 1) + 0.5).mul(same).requires_grad_()
    loss = info_nce(other, same)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(5), rel=1e-6)
    assert other.grad.abs().max() < 1e-6


def test_embedding_health_against_float64_reference():
    from rsvheat.pretraining.model import embedding_health

    a, b = torch.randn(16, 8), torch.randn(16, 8)
    h = embedding_health(a, b)
    ua, ub = (x.double() / x.double().norm(dim=1, keepdim=True) for x in (a, b))
    both = torch.cat([ua, ub])
    assert h["std"] == pytest.approx(both.std(0).mean().item() * math.sqrt(8), rel=1e-5)
    s = np.linalg.svd(both.numpy(), compute_uv=False)
    p = s / s.sum()
    assert h["rank"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-4)
    assert h["alignment"] == pytest.approx(((ua - ub) ** 2).sum(1).mean().item(), rel=1e-5)
    d2 = torch.cdist(both, both) ** 2
    iu = torch.triu_indices(32, 32, 1)
    assert h["uniformity"] == pytest.approx(torch.exp(-2 * d2[iu[0], iu[1]]).mean().log().item(), rel=1e-4)
    assert h["nce_ratio"] == pytest.approx(info_nce(a, b).item() / math.log(16), rel=1e-6)
    collapsed = embedding_health(torch.ones(16, 8) + 1e-4 * a, torch.ones(16, 8))
    assert collapsed["std"] < 0.01 and collapsed["rank"] < 1.1 and collapsed["nce_ratio"] == pytest.approx(1, abs=1e-3)


def test_forward_terms_and_ablation_switches():
    model = micro_pretrainer()
    pair = {"optical": torch.randn(2, 3, 64, 64), "sar": torch.randn(2, 1, 64, 64)}
    out = model(pair)
    assert set(out.terms) == {"spa", "fre", "con"} and torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(sum(v.item() for v in out.terms.values()), rel=1e-5)
    # L_con = mean of the low/high term of each modality and the cross-modal term: its logged halves recombine
    con_freq, con_modal = out.parts["con_freq"].item(), out.parts["con_modal"].item()
    assert out.terms["con"].item() == pytest.approx((2 * con_freq + con_modal) / 3, rel=1e-5)
    assert set(model({"optical": pair["optical"]}).parts) == {"con_freq"}
    x, low, high, recon = out.previews["sar"]
    assert recon.shape == x.shape == low.shape == high.shape == (2, 1, 64, 64)
    torch.testing.assert_close(low + high, x, atol=1e-5, rtol=0)
    off = micro_pretrainer(loss_weights={"fre": 0, "con": 0})
    assert set(off(pair).terms) == {"spa"}
    weighted = micro_pretrainer(loss_weights={"spa": 2.0, "fre": 0.5, "con": 0.0})
    out = weighted(pair)
    assert out.loss.item() == pytest.approx(2 * out.terms["spa"].item() + 0.5 * out.terms["fre"].item(), rel=1e-5)
    with pytest.raises(ValueError, match="loss_weights"):
        micro_pretrainer(loss_weights={"mae": 1.0})
    with pytest.raises(ValueError, match="unknown modality 'lidar'"):
        model({"lidar": torch.randn(1, 1, 64, 64)})


def test_the_default_objective_is_the_view_contrast_alone():
    cfg = dict(variant="rsvheat_tiny", img_size=64, proj_dim=8, encoder_kwargs=MICRO, modalities={"optical": 3})
    model = FrequencyPretrainer(**cfg)
    assert model.decoder is None  # no reconstruction modules to train (or for DDP to find unused)
    out = model({"optical": torch.randn(2, 3, 64, 64)})
    assert set(out.terms) == {"con"} and out.loss.item() == pytest.approx(out.terms["con"].item())


def test_gradients_reach_every_encoder_part():
    model = micro_pretrainer()
    model({"optical": torch.randn(2, 3, 64, 64), "sar": torch.randn(2, 1, 64, 64)}).loss.backward()
    enc = model.encoder
    for name in (
        "stems.optical.conv1.weight",
        "stems.sar.conv1.weight",
        "stages.0.freq_embed",
        "stages.3.heat_capacity",
        "stages.2.blocks.0.hco.to_k.weight",
    ):
        grad = enc.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    # every trainable parameter is on the loss path (DDP requires it without find_unused_parameters)
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    ablated = micro_pretrainer(loss_weights={"con": 0.0}, modalities={"optical": 3})
    ablated({"optical": torch.randn(2, 3, 64, 64)}).loss.backward()
    assert [n for n, p in ablated.named_parameters() if p.requires_grad and p.grad is None] == []


def test_paper_reading_reconstruct_from_low_hides_the_high_frequencies():
    """views="low_high" with reconstruct_from="low": the decoder's output depends on I_low alone (the high part is a
    target to predict, not an input), while I_high still shapes L_con; every trainable parameter stays on the loss
    path. With "both" the decoder reads I_high too."""
    from rsvheat.pretraining.masking import FrequencySplit

    torch.manual_seed(0)
    model = micro_pretrainer(views="low_high", reconstruct_from="low", modalities={"optical": 3}).eval()
    x = torch.randn(2, 3, 64, 64)
    split = model.masking(x)
    other = FrequencySplit(split.low, torch.randn_like(split.high), split.high_mask, split.ratio)
    a, b = model({"optical": x}, {"optical": split}), model({"optical": x}, {"optical": other})
    torch.testing.assert_close(a.previews["optical"][3], b.previews["optical"][3])
    assert a.terms["con"].item() != pytest.approx(b.terms["con"].item())
    assert model.fuse_frequency is None
    model.train()({"optical": x}).loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    both = micro_pretrainer(views="low_high", reconstruct_from="both", modalities={"optical": 3}).eval()
    assert not torch.allclose(
        both({"optical": x}, {"optical": split}).previews["optical"][3],
        both({"optical": x}, {"optical": other}).previews["optical"][3],
    )
    with pytest.raises(ValueError, match="reconstruct_from"):
        micro_pretrainer(reconstruct_from="high")
    with pytest.raises(ValueError, match="reconstruct_from must be 'low'"):
        micro_pretrainer(views="crops", reconstruct_from="both")
    with pytest.raises(ValueError, match="views='low_high'"):
        micro_pretrainer()({"optical": x}, {"optical": split})


def test_default_views_hide_the_high_band_from_the_encoder():
    """The default (views="crops"): the encoder sees only I_low of each augmented view (no energy in the outer 20 %
    of the spectrum, which every draw of the 20-30 % ratio hides), while the loss targets are the whole views."""
    from rsvheat.operators.dct import dct2d
    from rsvheat.pretraining.masking import normalised_radius

    model = micro_pretrainer(modalities={"optical": 3})
    seen = []
    model.encoder.stems["optical"].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    x = torch.randn(3, 3, 40, 48)
    out = model({"optical": x})
    (encoded,) = seen
    assert encoded.shape == (6, 3, 40, 48)  # two views of each image, one pass
    radius = normalised_radius(40, 48)
    outer = radius >= torch.quantile(radius.flatten(), 0.8)
    spectrum = dct2d(encoded.double())
    assert spectrum[..., outer].abs().max() < 1e-4 * spectrum.abs().max()
    view, low, high, recon = out.previews["optical"]
    torch.testing.assert_close(low + high, view, atol=1e-5, rtol=0)
    assert high.abs().mean() > 0.05  # the hidden band is not empty: there is something to predict
    assert not torch.allclose(view, x, atol=1e-2)  # a view is a new crop, not the image


@pytest.mark.parametrize("masked_views", [1, 0])
def test_masked_views_show_the_encoder_whole_views(masked_views):
    """``masked_views=1``: the first view is low-passed, the second reaches the encoder whole (its outer spectrum
    carries energy); ``0``: both whole. The reconstruction terms refuse a view that could be copied."""
    from rsvheat.operators.dct import dct2d
    from rsvheat.pretraining.masking import normalised_radius

    model = micro_pretrainer(
        modalities={"optical": 3}, loss_weights={"spa": 0.0, "fre": 0.0}, masked_views=masked_views
    )
    seen = []
    model.encoder.stems["optical"].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    model({"optical": torch.randn(3, 3, 40, 48)})
    radius = normalised_radius(40, 48)
    outer_energy = dct2d(seen[0].double())[..., radius >= torch.quantile(radius.flatten(), 0.8)].abs().amax((1, 2))
    whole = outer_energy > 1e-2
    assert whole.tolist() == [False] * 3 * masked_views + [True] * 3 * (2 - masked_views)
    with pytest.raises(ValueError, match="masked_views=2"):
        micro_pretrainer(masked_views=masked_views)
    with pytest.raises(ValueError, match="masked_views must be"):
        micro_pretrainer(loss_weights={"spa": 0.0, "fre": 0.0}, masked_views=3)


def test_local_crops_add_small_low_passed_views_matched_to_both_full_views():
    """Multi-crop: after the two full views the encoder sees ``local_crops`` views per image at half the side (odd
    sizes floored), low-passed like the full views; the loss is the mean InfoNCE over the full pair and every
    small-full pair, with and without a queue; options that cannot use small views refuse them."""
    from rsvheat.operators.dct import dct2d
    from rsvheat.pretraining.masking import normalised_radius

    torch.manual_seed(0)
    model = micro_pretrainer(modalities={"optical": 3}, loss_weights={"spa": 0.0, "fre": 0.0}, local_crops=2)
    seen = []
    model.encoder.stems["optical"].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    z = {}
    model.projector.register_forward_hook(lambda module, args, out: z.setdefault(len(z), out))
    out = model({"optical": torch.randn(3, 3, 67, 80)})
    assert [tuple(x.shape) for x in seen] == [(6, 3, 67, 80), (6, 3, 33, 40)]
    radius = normalised_radius(33, 40)
    outer = dct2d(seen[1].double())[..., radius >= torch.quantile(radius.flatten(), 0.8)]
    assert outer.abs().max() < 1e-4  # the small views' high band is hidden too
    full_first, full_second, small = z[0], z[1], z[2].chunk(2)
    pairs = [(full_first, full_second), *((s, f) for s in small for f in (full_first, full_second))]
    expected = torch.stack([info_nce(a, b, model.temperature) for a, b in pairs]).mean()
    torch.testing.assert_close(out.terms["con"], expected)
    small_loss = torch.stack([info_nce(a, b, model.temperature) for a, b in pairs[1:]]).sum()
    (stem_grad,) = torch.autograd.grad(small_loss, next(model.encoder.stems["optical"].parameters()))
    assert stem_grad.abs().sum() > 0  # the small views train the encoder
    queued = micro_pretrainer(
        modalities={"optical": 3}, loss_weights={"spa": 0.0, "fre": 0.0}, local_crops=2, negatives=8
    )
    assert torch.isfinite(queued({"optical": torch.randn(3, 3, 64, 64)}).loss)
    assert queued.queue_next.tolist() == [6]  # only the full views' keys are queued
    with pytest.raises(ValueError, match="local_crops"):
        micro_pretrainer(views="low_high", local_crops=2)
    with pytest.raises(ValueError, match="local_crops"):
        micro_pretrainer(loss_weights={"spa": 1.0, "fre": 1.0, "con": 0.0}, local_crops=2)


def test_view_augment_is_a_shared_random_geometry():
    """ViewAugment: one geometry per image for every modality of a pair; the full-scale identity-ratio draw of a
    crop reproduces the image up to flips and 90 degree turns; shapes kept on odd sizes."""
    from rsvheat.pretraining.model import ViewAugment

    x = torch.arange(2 * 7 * 9, dtype=torch.float32).view(2, 1, 7, 9)
    pair = {"optical": x.expand(2, 3, 7, 9), "sar": x}
    views = ViewAugment()(pair)
    assert views["optical"].shape == (2, 3, 7, 9) and views["sar"].shape == (2, 1, 7, 9)
    torch.testing.assert_close(views["optical"][:, :1], views["sar"])  # co-registered
    square = torch.arange(36.0).view(1, 1, 6, 6).expand(8, 1, 6, 6)
    whole = ViewAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0))({"optical": square})["optical"]
    turns = [square[0].rot90(k, (-2, -1)) for k in range(4)]
    images = [t.flip(d) for t in turns for d in ((), (-1,), (-2,), (-2, -1))]
    for view in whole:  # each is the image flipped and/or turned, resampled exactly
        assert any(torch.allclose(view, image, atol=1e-4) for image in images)
    with pytest.raises(ValueError, match="scale"):
        ViewAugment(scale=(0.0, 1.0))
    # the radiometric jitter: per band gain about the mean and a shift, bounded by the strength; geometry untouched
    images = torch.randn(64, 4, 8, 8) * 2 + 5
    jittered = ViewAugment(jitter=0.4).radiometric(images)
    mean, std = images.mean((2, 3)), images.std((2, 3))
    shift = (jittered.mean((2, 3)) - mean) / std
    coloured = jittered.std((2, 3)).std(1) > 0  # images not turned grey
    assert coloured.float().mean() > 0.6 and shift[coloured].abs().max() <= 0.4 + 1e-4
    ratio = jittered.std((2, 3))[coloured] / std[coloured]
    assert ratio.min() >= 0.6 - 1e-4 and ratio.max() <= 1.4 + 1e-4 and ratio.std() > 0.05
    assert torch.equal(ViewAugment().radiometric(images), images)


def _landsat_crops(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` random ``size``² crops of the embedded Landsat scene, standardised per band: real imagery."""
    import rasterio

    from rsvheat.data import sample_scene_path

    with rasterio.open(sample_scene_path()) as src:
        scene = torch.from_numpy(src.read().astype(np.float32))
    scene = (scene - scene.mean((1, 2), keepdim=True)) / scene.std((1, 2), keepdim=True)
    ys = torch.randint(0, scene.shape[1] - size, (count,), generator=generator).tolist()
    xs = torch.randint(0, scene.shape[2] - size, (count,), generator=generator).tolist()
    return torch.stack([scene[:, y : y + size, x : x + size] for y, x in zip(ys, xs, strict=True)])


def _contrast_run(views: str, steps: int = 40, batch: int = 32, **kwargs) -> list[dict[str, float]]:
    """The contrastive term alone on real crops; the health of each step's embeddings."""
    from rsvheat.pretraining.model import embedding_health

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = micro_pretrainer(
        views=views,
        loss_weights={"spa": 0, "fre": 0, "con": 1},
        modalities={"optical": 3},
        img_size=32,
        proj_dim=32,
        encoder_kwargs={**MICRO, "dims": (16, 32, 64, 128)},
        **kwargs,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(steps):
        out = model({"optical": _landsat_crops(batch, 32, generator)})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first, second = out.embeddings["optical"]
        unit = [torch.nn.functional.normalize(z, dim=-1) for z in (first, second)]
        side_std = [u.std(0).mean().item() * u.shape[1] ** 0.5 for u in unit]
        history.append({**embedding_health(first, second, model.temperature), "side_std": min(side_std)})
    return history


def test_paper_views_reach_the_dead_point_and_crop_views_learn():
    """The mechanism behind a dead L_con, on real crops in seconds. Paired I_low/I_high views of one image start
    *less* alike than the negatives (InfoNCE above ln B), collapse to one direction within a few steps (normalised
    std near 0) and sit at chance (InfoNCE = ln B), where the gradient vanishes. The default crop views fall below
    half of ln B and stay spread."""
    paper = _contrast_run("low_high")
    assert paper[0]["nce_ratio"] > 1.05
    dead = min(paper[2:25], key=lambda h: h["side_std"])
    assert dead["side_std"] < 0.2 and abs(dead["nce_ratio"] - 1) < 0.03, dead
    crops = _contrast_run("crops")
    assert crops[-1]["nce_ratio"] < 0.5, crops[-1]
    assert min(h["std"] for h in crops[5:]) > 0.5 and crops[-1]["rank"] > 5


def test_queue_nce_matches_float64_reference():
    torch.manual_seed(0)
    q, k, queue = torch.randn(5, 8), torch.randn(5, 8), torch.nn.functional.normalize(torch.randn(7, 8), dim=1)
    qd, kd = (torch.nn.functional.normalize(t.double(), dim=1) for t in (q, k))
    logits = torch.cat([(qd * kd).sum(1, keepdim=True), qd @ queue.double().T], 1) / 0.2
    reference = (torch.logsumexp(logits, 1) - logits[:, 0]).mean()
    assert queue_nce(q, k, queue, 0.2).item() == pytest.approx(reference.item(), rel=1e-5)


def test_queue_holds_the_latest_keys_and_the_key_encoder_follows_slowly():
    torch.manual_seed(0)
    model = micro_pretrainer(loss_weights={"spa": 0, "fre": 0}, modalities={"optical": 3}, negatives=10, momentum=0.9)
    assert not any(p.requires_grad for p in model.key_encoder.parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    images = {"optical": torch.randn(3, 3, 64, 64)}
    model(images).loss.backward()  # step 1: keys of 2 x 3 views fill rows 0-5
    opt.step()
    assert model.queue_next.tolist() == [6]
    before = [k.clone() for k in model.key_encoder.parameters()]
    online = [p.detach().clone() for p in model.encoder.parameters()]
    out = model(images)  # step 2: the momentum update first, then rows 6-9 and 0-1 (the queue wraps)
    for b, k, p in zip(before, model.key_encoder.parameters(), online, strict=True):
        torch.testing.assert_close(k, 0.9 * b + 0.1 * p)
    assert model.queue_next.tolist() == [2]
    torch.testing.assert_close(model.queue_optical.norm(dim=1), torch.ones(10))
    model.eval()
    queue = model.queue_optical.clone()
    with torch.no_grad():
        model(images)
    assert torch.equal(model.queue_optical, queue) and model.queue_next.tolist() == [2]  # evaluation enqueues nothing
    assert torch.isfinite(out.loss) and out.loss.item() > 0
    with pytest.raises(ValueError, match="negatives"):
        micro_pretrainer(views="low_high", negatives=10)


def test_queued_negatives_learn_on_real_crops():
    history = _contrast_run("crops", negatives=64, momentum=0.9)
    ratio = [h["nce_ratio"] for h in history]
    assert sum(ratio[-5:]) / 5 < sum(ratio[:5]) / 5 - 0.1, ratio  # the in-batch InfoNCE falls: views are told apart
    assert min(h["std"] for h in history[5:]) > 0.5


def test_odd_sizes_reconstruct_at_input_size():
    model = micro_pretrainer()
    out = model({"optical": torch.randn(2, 3, 72, 100)})
    assert out.previews["optical"][3].shape == (2, 3, 72, 100)


def test_tiny_model_overfits_two_images():
    torch.manual_seed(0)
    model = micro_pretrainer(loss_weights={"con": 0.0})
    images = {"optical": torch.nn.functional.avg_pool2d(torch.randn(2, 3, 64, 64), 5, 1, 2)}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = model(images)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_decoder_depth_adds_blocks_and_keeps_old_checkpoints_loadable():
    shallow, deep = micro_pretrainer(), micro_pretrainer(decoder_depth=3)
    assert not any(".deeper." in k for k in shallow.state_dict())  # depth 1 keeps the keys checkpoints hold
    assert sum(".deeper." in k and k.endswith("0.weight") for k in deep.state_dict()) == 2
    x = torch.randn(2, 3, 64, 64)
    out = deep({"optical": x})
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert deep.decoder.deeper[1][0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="decoder_depth must be at least 1"):
        micro_pretrainer(decoder_depth=0)
