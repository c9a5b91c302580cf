import pytest
import torch

from fewshot_fixtures import one_thread  # noqa: F401

from reptile_fused.models import (
    MiniImageNetNet,
    OmniglotNet,
    SineMLP,
    build_model,
    count_parameters,
    model_spec,
    same_weights,
)


def test_omniglot_net_shapes():
    net = OmniglotNet(num_classes=5)
    assert net(torch.rand(7, 1, 28, 28)).shape == (7, 5)
    # 28 -> 14 -> 7 -> 4 -> 2, so the classifier sees 64 * 2 * 2 features.
    assert net.classifier.in_features == 256
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.stride, c.kernel_size) for c in convs] == [(64, (2, 2), (3, 3))] * 4
    # conv 1->64 (640) + 3 x conv 64->64 (36928) + 4 x BN (128) + linear 256->5 (1285)
    assert count_parameters(net) == 640 + 3 * 36928 + 4 * 128 + 1285


def test_miniimagenet_net_shapes():
    net = MiniImageNetNet(num_classes=5)
    assert net(torch.rand(3, 3, 84, 84)).shape == (3, 5)
    # 84 -> 42 -> 21 -> 11 -> 6 with round-up pooling.
    assert net.classifier.in_features == 32 * 6 * 6
    # conv 3->32 (896) + 3 x conv 32->32 (9248) + 4 x BN (64) + linear 1152->5 (5765)
    assert count_parameters(net) == 896 + 3 * 9248 + 4 * 64 + 5765


def test_sine_mlp():
    net = SineMLP()
    assert net(torch.rand(10, 1)).shape == (10, 1)
    assert [tuple(p.shape) for p in net.parameters()] == [(64, 1), (64,), (64, 64), (64,), (1, 64), (1,)]


@pytest.mark.parametrize("cls, shape", [(OmniglotNet, (6, 1, 28, 28)), (MiniImageNetNet, (6, 3, 84, 84))])
def test_batch_norm_uses_batch_statistics_always(cls, shape):
    net = cls(num_classes=3)
    x = torch.rand(shape)
    train_out = net.train()(x)
    eval_out = net.eval()(x)
    torch.testing.assert_close(train_out, eval_out, rtol=0, atol=0)
    # A prediction depends on the rest of its batch, which is why the evaluation
    # protocol matters (transductive or not).
    alone = net(x[:1])
    assert not torch.allclose(alone, eval_out[:1])
    assert not any(b.numel() for b in net.buffers()), "no running statistics to carry between tasks"


def test_build_model_from_spec_and_seed():
    spec = model_spec("folder", ways=4, image_shape=(3, 32, 32), arch="omniglot")
    assert spec == {"name": "omniglot", "num_classes": 4, "in_channels": 3, "image_size": 32}
    torch.manual_seed(0)
    a = build_model(spec)
    torch.manual_seed(0)
    b = build_model(spec)
    assert same_weights(a, b)
    assert a(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    assert model_spec("omniglot", 5, (1, 28, 28))["name"] == "omniglot"
    assert model_spec("miniimagenet", 5, (3, 84, 84))["name"] == "miniimagenet"
    assert build_model(model_spec("sine", 1)).__class__ is SineMLP
    with pytest.raises(ValueError, match="unknown model"):
        build_model({"name": "resnet"})
