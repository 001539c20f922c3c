"""Parameter and FLOP counts reproduce the published vHeat / RS-vHeat numbers (inference-folded convention)."""

import pytest
import timm
import torch
from torch.utils.checkpoint import checkpoint

from rsvheat.models.counting import activation_bytes, count, count_gmacs, count_params, kernel_counts
from rsvheat.operators.dct import _dct_basis_cached
from rsvheat.operators.heat import _frequency_sq_cached
from tests.conftest import micro_model

# (variant, image size, classifier classes, published M params, published G MACs)
PUBLISHED = [
    ("vheat_tiny", 224, 1000, 29.56, 4.59),
    ("vheat_small", 224, 1000, 50.05, 8.48),
    ("vheat_base", 224, 1000, 87.50, 14.93),
]


@pytest.mark.parametrize(("variant", "size", "classes", "mparams", "gmacs"), PUBLISHED)
def test_published_vheat_counts_within_one_percent(variant, size, classes, mparams, gmacs):
    c = count(timm.create_model(variant, num_classes=classes), size, variant)
    assert c.params_folded / 1e6 == pytest.approx(mparams, rel=0.01)
    assert c.gmacs_folded == pytest.approx(gmacs, rel=0.01)
    assert c.params_train > c.params_folded  # to_k and FVE are trained, not run


@pytest.mark.slow
def test_rs_vheat_base_at_1024_matches_the_paper():
    model = timm.create_model("rsvheat_base", num_classes=0, img_size=1024)
    params = count_params(model, (1024, 1024))
    assert params["folded"] / 1e6 == pytest.approx(148.4, rel=0.01)
    # a runnable folded model also keeps the SCE (the official infer_init deletes it, then crashes)
    assert params["folded_runtime"] - params["folded"] == sum(
        (1024 // 4 // 2**i) ** 2 * d for i, d in enumerate(model.dims)
    )
    assert count_gmacs(model, (1024, 1024), folded=True) == pytest.approx(336.8, rel=0.01)


def test_train_mode_counts_to_k_on_the_fve():
    model = timm.create_model("vheat_tiny", num_classes=1000)
    folded = count_gmacs(model, (224, 224), folded=True)
    train = count_gmacs(model, (224, 224), folded=False)
    to_k = sum(s.freq_embed.numel() * s.dim * len(s.blocks) for s in model.stages) / 1e9
    assert train - folded == pytest.approx(to_k, rel=1e-6)
    assert model.training  # counting restores the mode


def test_matmul_counts_alone_are_the_lower_bound():
    model = timm.create_model("vheat_tiny", num_classes=1000)
    assert count_gmacs(model, (224, 224), folded=True, fvcore=False) < count_gmacs(model, (224, 224), folded=True)
    assert torch.is_grad_enabled()


def test_activation_bytes_counts_what_the_backward_pass_keeps():
    x = torch.randn(1000, requires_grad=True)

    def chain(v):
        return v.exp().sin()  # sin's backward needs exp's output (4000 bytes); the sine itself is not kept

    assert activation_bytes(lambda: chain(x).sum())[1] == 4000
    # checkpointing keeps only its input: none when it is x (not created by the forward), all of it when it is new
    assert activation_bytes(lambda: checkpoint(chain, x, use_reentrant=False).sum())[1] == 0
    assert activation_bytes(lambda: checkpoint(chain, x * 2, use_reentrant=False).sum())[1] == 4000


def clear_operator_caches() -> None:
    _dct_basis_cached.cache_clear()
    _frequency_sq_cached.cache_clear()


def test_activation_bytes_of_a_model_equal_autograds_saved_tensors():
    # an independent count: every storage autograd packs for the backward pass, parameters and the input excluded
    model = micro_model(drop_path_rate=0.0)
    x = torch.randn(2, 3, 45, 39)
    excluded = {t.untyped_storage().data_ptr() for t in [x, *model.parameters(), *model.buffers()]}
    packed = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in excluded:
            packed[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    # each count starts without the operators' cached constants (DCT bases, frequency grids): both then see the
    # constants built (and kept) by their forward
    clear_operator_caches()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x).square().mean()
    expected = sum(packed.values())
    del out
    clear_operator_caches()
    held = activation_bytes(lambda: model(x).square().mean())[1]
    assert held == expected > 0
    model.set_grad_checkpointing(True, blocks=2)  # the first two blocks keep only their inputs
    assert 0 < activation_bytes(lambda: model(x).square().mean())[1] < held


def test_kernel_counts_count_compute_not_views():
    x, w, b = torch.randn(64, 32), torch.randn(32, 16), torch.randn(16)
    # the transpose is a view, contiguous() then copies; addmm is one kernel whatever the CPU runs inside it
    counts = kernel_counts(lambda: torch.relu(torch.addmm(b, x, w)).t().contiguous().view(-1))
    assert counts == {"addmm": 1, "clamp_min": 1, "copy_": 1}


def test_folding_takes_the_layer_scale_out_of_the_forward():
    model = micro_model().eval()  # post-norm with layer scale: 5 blocks
    x = torch.randn(1, 3, 64, 64)

    def forward():
        with torch.inference_mode():
            model(x)

    forward()
    unfolded = kernel_counts(forward)
    model.fold((64, 64))
    forward()
    folded = kernel_counts(forward)
    # per block: the filter exp(-kt w²), and the LN affines of both norms stacked and multiplied by the layer scales
    assert unfolded["mul"] == unfolded["cat"] == 5 * 2 and unfolded["exp_"] == 5
    assert folded["mul"] == folded["cat"] == folded["exp_"] == 0
    assert folded["native_layer_norm"] == unfolded["native_layer_norm"]
