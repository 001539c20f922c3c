"""``torch.compile(fullgraph=True)``: every variant's block type (vHeat-T's pre-norm blocks, the post-norm
layer-scaled blocks with SCE of S/B) in every execution path (training, evaluation computed, evaluation folded)
traces as one graph, gives eager's outputs and gradients, and does not recompile for new inputs of the compiled
size. Shapes are static: each input size compiles once (the DCT bases and folded filters are per size).

The graph is checked with the ``aot_eager`` backend (dynamo + AOTAutograd, forward and backward, no code
generation: seconds on a CPU); one test runs inductor's code generation on a micro model in evaluation (a cold
compile of the training graph too would take minutes of the suite's CPU time)."""

import pytest
import torch
import torch._dynamo

from rsvheat.models.rsvheat import VARIANTS, RSVHeat

MICRO = {"depths": (1, 1, 2, 1), "dims": (8, 16, 32, 64), "drop_path_rate": 0.0}


def micro(variant: str, **kwargs) -> RSVHeat:
    """The variant's block type (norm placement, layer scale, SCE) at micro depth and width."""
    torch.manual_seed(0)
    return RSVHeat(**{**VARIANTS[variant], **MICRO, **kwargs}, img_size=64, num_classes=5)


def set_path(model: RSVHeat, path: str) -> RSVHeat:
    model.unfold()
    model.train(path == "train")
    if path == "folded":
        model.fold()
    return model


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("path", ["train", "eval", "folded"])
@pytest.mark.parametrize("variant", ["rsvheat_tiny", "rsvheat_base"])
def test_fullgraph_compiles_every_variant_and_path(variant, path):
    model = set_path(micro(variant), path)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 64, 64, requires_grad=path == "train")
    with torch.set_grad_enabled(path == "train"):
        expected, out = model(x), compiled(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        if path == "train":
            (grad_eager,) = torch.autograd.grad(expected.square().sum(), x)
            (grad_compiled,) = torch.autograd.grad(out.square().sum(), x)
            torch.testing.assert_close(grad_compiled, grad_eager, rtol=1e-4, atol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):  # a new batch of the same size reuses the graph
            compiled(torch.randn(2, 3, 64, 64, requires_grad=x.requires_grad))


def test_other_sizes_compile_once_each_and_match_eager():
    from torch._dynamo.testing import CompileCounterWithBackend

    model = set_path(micro("rsvheat_base"), "eval")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter, dynamic=False)
    with torch.no_grad():
        for size in [(64, 64), (96, 80), (64, 64)]:
            x = torch.randn(1, 3, *size)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 2


@pytest.mark.slow
def test_inductor_matches_eager():
    model = set_path(micro("rsvheat_base", depths=(1, 1, 1, 1)), "eval")
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.smoke
def test_serving_graphs_stay_static_after_another_shape_was_compiled():
    """Dynamo turns a frame's graphs symbolic once it has seen a second shape, and every module's call shares one
    frame. So a model served after a compiled training (other shapes, same process) would trace symbolic graphs
    (slower) unless compiled with ``dynamic=False``, as the serving commands do."""
    from rsvheat.models.precision import compile_in_place

    symbolic = []

    def backend(graph, inputs):
        shapes = [s for x in inputs if isinstance(x, torch.Tensor) for s in x.shape]
        symbolic.append(any(isinstance(v, torch.SymInt) for v in [*inputs, *shapes]))
        return graph.forward

    trained = compile_in_place(torch.nn.Linear(4, 3), backend)
    trained(torch.randn(2, 4))
    trained(torch.randn(5, 4))
    served = compile_in_place(torch.nn.Linear(4, 3), backend, dynamic=False)
    served(torch.randn(7, 4))
    served(torch.randn(3, 4))
    assert symbolic == [False, True, False, False]


@pytest.mark.smoke
def test_frozen_compilation_folds_the_weights_into_the_graph():
    """Serving compiles with the weights frozen, constants of the graph (inductor's freezing): same outputs as eager,
    and the flag stays with that module (a later compile in the process is not frozen)."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    from rsvheat.models.precision import compile_in_place

    torch.manual_seed(0)
    x = torch.randn(8, 16)
    for frozen in (True, False):
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)).eval()
        # a graph served from the cache generates no code to read
        with torch.no_grad(), inductor_config.patch(fx_graph_cache=False):
            eager = model(x)
            compile_in_place(model, frozen=frozen, dynamic=False)
            out, (code,) = run_and_get_code(model, x)
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
        assert ("_frozen_param" in code) == frozen
        assert not inductor_config.freezing
