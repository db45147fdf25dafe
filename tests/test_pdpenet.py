import pytest
import torch
from custom_nets import PDPENet
from scripts import physics

TINY = {"channels": (4, 8, 16), "embed_dim": 4}
# (TR, TE, TI) in ms per series, inside the training ranges.
PROTOCOL_MS = [[500.0, 15.0, 0.0], [4000.0, 100.0, 0.0], [9000.0, 120.0, 2500.0]]


def make_inputs(batch=2, size=(32, 32), seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, *size, generator=gen)
    params = physics.normalize_parameters(torch.tensor(PROTOCOL_MS)).expand(batch, -1, -1).clone()
    return images, params


@pytest.fixture
def net():
    torch.manual_seed(0)
    return PDPENet(**TINY).eval()


@pytest.mark.parametrize("size", [(32, 32), (64, 96), (256, 256)])
@pytest.mark.parametrize("embed", [True, False])
def test_output_shape(size, embed):
    images, params = make_inputs(size=size)
    with torch.no_grad():
        out = PDPENet(embed_parameters=embed, **TINY)(images, params)
    assert out.shape == (2, 3, *size)


def test_volumes():
    out = PDPENet(spatial_dims=3, channels=(4, 8), embed_dim=4)(torch.rand(1, 3, 8, 16, 8), torch.rand(1, 3, 3))
    assert out.shape == (1, 3, 8, 16, 8)


def test_output_non_negative_and_trainable_when_pre_activation_is_negative(net):
    with torch.no_grad():
        net.head[0].conv.bias.fill_(-20.0)  # pre-activation far below 0 everywhere
    images, params = make_inputs()
    out = net(images, params)
    assert (out >= 0).all() and torch.isfinite(out).all()
    out.sum().backward()
    assert net.head[0].conv.bias.grad.abs().min() > 0  # softplus keeps the gradient that ReLU would kill


def test_sequence_parameters_change_the_output(net):
    images, params = make_inputs()
    changed = params.clone()
    changed[:, 1, 1] *= 1.5  # T2w echo time
    with torch.no_grad():
        assert (net(images, params) - net(images, changed)).abs().max() > 1e-4


def test_baseline_ignores_parameters_exactly():
    torch.manual_seed(0)
    net = PDPENet(embed_parameters=False, **TINY).eval()
    images, params = make_inputs()
    with torch.no_grad():
        reference = net(images, params)
        assert torch.equal(reference, net(images, torch.rand_like(params)))
        assert torch.equal(reference, net(images))
    assert not any("embedding" in name or "fusion" in name for name, _ in net.named_parameters())


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    net = PDPENet(**TINY)
    images, params = make_inputs()
    net(images, params).square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    largest = max(p.grad.abs().max() for p in net.parameters())
    # relative threshold: a conv bias cancelled by the next normalisation still gets round-off (~1e-9 x largest)
    dead = [name for name, p in net.named_parameters() if not p.grad.abs().max() > 1e-6 * largest]
    assert dead == []


@pytest.mark.parametrize("embed", [True, False])
def test_torchscript_round_trip(tmp_path, embed):
    torch.manual_seed(0)
    net = PDPENet(embed_parameters=embed, **TINY).eval()
    path = tmp_path / "net.ts"
    torch.jit.save(torch.jit.script(net), str(path))
    loaded = torch.jit.load(str(path))
    images, params = make_inputs(size=(32, 64))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, params), net(images, params), atol=1e-6, rtol=0)


def test_default_params_serve_single_input_callers(tmp_path):
    images, params = make_inputs()
    torch.manual_seed(0)
    net = PDPENet(default_params=params[0].tolist(), **TINY).eval()
    torch.jit.save(torch.jit.script(net), str(tmp_path / "net.ts"))
    loaded = torch.jit.load(str(tmp_path / "net.ts"))
    with torch.no_grad():
        expected = net(images, params)
        torch.testing.assert_close(net(images), expected, atol=0, rtol=0)
        torch.testing.assert_close(loaded(images), expected, atol=1e-6, rtol=0)
    assert "default_params" not in net.state_dict()  # never overwritten by a checkpoint


def test_embedding_network_requires_params(net):
    images, _ = make_inputs()
    with pytest.raises(ValueError, match="params"):
        net(images)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"channels": (8,)}, "at least 2"),
        ({"channels": (8, 0)}, "positive"),
        ({"spatial_dims": 1}, "spatial_dims"),
        ({"embed_dim": 0}, "embed_dim"),
        ({"dropout": 1.0}, "dropout"),
        ({"default_params": [[0.1, 0.1, 0.0]]}, r"default_params must have shape \(3, 3\)"),
    ],
)
def test_constructor_rejects_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PDPENet(**{**TINY, **kwargs})


def test_forward_rejects_bad_shapes(net):
    images, params = make_inputs(size=(30, 32))
    with pytest.raises(ValueError, match="divisible by 4"):
        net(images, params)
    images, params = make_inputs()
    with pytest.raises(ValueError, match="params must have shape"):
        net(images, params[:, :2])
    with pytest.raises(ValueError, match="images must have shape"):
        net(images[:, :2], params)
