import numpy as np
import pytest
import scipy.fft
import torch

from rsvheat.pretraining import FrequencyMasking, normalised_radius


@pytest.mark.parametrize("size", [(224, 224), (120, 97), (33, 64)])
@pytest.mark.parametrize("bands", [1, 3, 12])
def test_low_plus_high_is_the_image_and_the_ratio_is_exact(size, bands):
    images = torch.randn(4, bands, *size, dtype=torch.float64)
    split = FrequencyMasking((0.2, 0.3))(images)
    torch.testing.assert_close(split.low + split.high, images, rtol=1e-10, atol=1e-10)
    total = size[0] * size[1]
    counts = split.high_mask.flatten(1).sum(1)
    assert ((split.ratio >= 0.2) & (split.ratio <= 0.3)).all()
    assert (counts == torch.round(split.ratio * total).long()).all()
    assert not split.high_mask[:, 0, 0].any()  # DC always stays in the low part


def test_parts_are_the_inverse_dct_of_the_split_spectrum():
    image = torch.randn(1, 2, 40, 30, dtype=torch.float64)
    split = FrequencyMasking((0.25, 0.25))(image)
    spectrum = scipy.fft.dctn(image.numpy(), type=2, norm="ortho", axes=(-2, -1))
    keep = ~split.high_mask.numpy()[:, None]
    expected_low = scipy.fft.idctn(spectrum * keep, type=2, norm="ortho", axes=(-2, -1))
    np.testing.assert_allclose(split.low.numpy(), expected_low, atol=1e-10)


def test_ratio_can_be_read_as_the_low_part_share():
    images = torch.randn(2, 1, 40, 64, dtype=torch.float64)
    split = FrequencyMasking((0.05, 0.05), ratio_part="low")(images)
    assert (split.high_mask.flatten(1).sum(1) == 40 * 64 - round(0.05 * 40 * 64)).all()
    torch.testing.assert_close(split.low + split.high, images, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="ratio_part"):
        FrequencyMasking(ratio_part="middle")
    with pytest.raises(ValueError, match="high part's largest share 0.950"):  # 95 % of the spectrum in a sector
        FrequencyMasking((0.05, 0.1), sector_degrees=60, ratio_part="low")


def test_low_region_is_a_quarter_disc_around_dc():
    split = FrequencyMasking((0.3, 0.3))(torch.randn(1, 1, 50, 80))
    radius = normalised_radius(50, 80)
    high = split.high_mask[0]
    assert radius[high].min() >= radius[~high].max()


def test_sector_restricts_the_high_part_to_an_angle_range():
    masking = FrequencyMasking((0.2, 0.2), sector_degrees=60)
    split = masking(torch.randn(2, 1, 64, 64), ratio=torch.tensor([0.2, 0.2]), start=torch.tensor([0.0, 0.5]))
    n, m = torch.meshgrid(torch.arange(64) / 64, torch.arange(64) / 64, indexing="ij")
    angle = torch.atan2(m, n)
    for b, start in enumerate([0.0, 0.5]):
        inside = angle[split.high_mask[b]]
        assert inside.min() >= start - 1e-9 and inside.max() <= start + np.radians(60) + 1e-9
        assert split.high_mask[b].sum() == round(0.2 * 64 * 64)
    with pytest.raises(ValueError, match=r"sector_degrees >= 31\.0"):
        FrequencyMasking((0.2, 0.3), sector_degrees=30)


@pytest.mark.parametrize("degrees", [20, 45, 60, 80])
def test_every_sector_start_holds_the_largest_ratio_the_check_allows(degrees):
    """The construction-time check is the true worst case: at the allowed limit no start angle runs short."""
    from rsvheat.pretraining.masking import smallest_sector_for, smallest_sector_share

    share = smallest_sector_share(degrees)
    assert smallest_sector_for(share) == pytest.approx(degrees)
    ratio = share - 0.01  # a 200² grid resolves the shares to well within 0.01
    masking = FrequencyMasking((ratio, ratio), sector_degrees=degrees)
    starts = torch.linspace(0, np.radians(90 - degrees), 7, dtype=torch.float64)
    mask = masking.high_mask((200, 200), torch.full((7,), ratio), starts)
    assert (mask.flatten(1).sum(1) == round(ratio * 200 * 200)).all()
    # and just above the limit the narrowest placement cannot hold the ratio
    with pytest.raises(ValueError, match="sector holds"):
        masking.high_mask((200, 200), torch.tensor([share + 0.02]), torch.tensor([0.0], dtype=torch.float64))


@pytest.mark.parametrize("sector", [None, 60])
def test_batched_equals_per_image(sector):
    images = torch.randn(3, 3, 48, 56, dtype=torch.float64)
    masking = FrequencyMasking(sector_degrees=sector)
    ratio, start = masking.draw(3, torch.Generator().manual_seed(1))
    batched = masking(images, ratio=ratio, start=start)
    for i in range(3):
        one = None if start is None else start[i : i + 1]
        single = masking(images[i], ratio=ratio[i : i + 1], start=one)
        torch.testing.assert_close(single.low, batched.low[i])
        assert torch.equal(single.high_mask, batched.high_mask[i])


def test_split_stays_exact_under_bf16_autocast():
    """Lightning's bf16-mixed runs the training step under autocast; the DCTs must not drop to bf16 GEMMs."""
    images = torch.randn(2, 3, 40, 56)
    masking = FrequencyMasking((0.25, 0.25))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        split = masking(images)
    assert split.low.dtype == torch.float32
    torch.testing.assert_close(split.low + split.high, images, rtol=1e-5, atol=1e-5)
    reference = masking(images.double(), ratio=split.ratio.double())
    torch.testing.assert_close(split.low.double(), reference.low, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="ratio_range"):
        FrequencyMasking((0.3, 0.2))
    with pytest.raises(ValueError, match="sector_degrees"):
        FrequencyMasking(sector_degrees=120)
    image = torch.randn(1, 3, 16, 16)
    image[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        FrequencyMasking()(image)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) or \(C, H, W\)"):
        FrequencyMasking()(torch.randn(16, 16))
