"""Pre-training model and losses: exact against float64 references, zero on perfect reconstruction, gradients, ablation
switches, odd sizes, and learning."""

import numpy as np
import pytest
import torch
from scipy.fft import dctn

from rsvheat.pretraining.model import FrequencyPretrainer, frequency_loss, info_nce, spatial_loss

MICRO = {"depths": (1, 1, 1, 1), "dims": (8, 16, 32, 64), "drop_path_rate": 0.0}


def micro_pretrainer(**kwargs) -> FrequencyPretrainer:
    cfg = dict(variant="rsvheat_tiny", img_size=64, decoder_width=16, proj_dim=8, encoder_kwargs=MICRO)
    return FrequencyPretrainer(**{**cfg, **kwargs})


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


def test_reconstruct_from_low_hides_the_high_frequencies():
    """With reconstruct_from="low" the decoder's output depends on I_low alone (the high part is a target to predict,
    not an input), while I_high still shapes L_con; every trainable parameter stays on the loss path."""
    from rsvheat.pretraining.masking import FrequencySplit

    torch.manual_seed(0)
    model = micro_pretrainer(reconstruct_from="low", modalities={"optical": 3}).eval()
    x = torch.randn(2, 3, 64, 64)
    split = model.masking(x)
    other = FrequencySplit(split.low, torch.randn_like(split.high), split.high_mask, split.ratio)
    a, b = model({"optical": x}, {"optical": split}), model({"optical": x}, {"optical": other})
    torch.testing.assert_close(a.previews["optical"][3], b.previews["optical"][3])
    assert a.terms["con"].item() != pytest.approx(b.terms["con"].item())
    assert model.fuse_frequency is None
    model.train()({"optical": x}).loss.backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    both = micro_pretrainer(modalities={"optical": 3}).eval()
    assert not torch.allclose(
        both({"optical": x}, {"optical": split}).previews["optical"][3],
        both({"optical": x}, {"optical": other}).previews["optical"][3],
    )
    with pytest.raises(ValueError, match="reconstruct_from"):
        micro_pretrainer(reconstruct_from="high")


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
