"""tinyddpm/guidance.py and the class-conditional UNet: classifier-free guidance, checked.

eps_guided = (1 + w) eps(x, t, y) - w eps(x, t, null) (Ho & Salimans 2022, eq. 6), both
predictions from one call on a doubled batch; w = 0 is the conditional model itself.
"""
import numpy as np
import pytest

import autograd
from autograd import Tensor, nn, no_grad
from helpers import ELEMENT_TOL
from tinyddpm.diffusion import GaussianDiffusion
from tinyddpm.guidance import NULL_LABEL, Guided, balanced_labels, drop_labels
from tinyddpm.schedule import linear_betas
from tinyddpm.unet import UNet

MICRO = dict(in_channels=1, image_size=8, ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
             dropout=0.0, num_groups=4)


def conditional_unet(dtype=np.float64, seed=0):
    model = UNet(**MICRO, num_classes=10, rng=np.random.default_rng(seed), dtype=dtype).eval()
    rng = np.random.default_rng(seed + 1)
    for p in model.parameters():             # off the zero init, so that every path matters
        p.data += 0.1 * rng.standard_normal(p.shape).astype(dtype)
    return model


def inputs(B=3, dtype=np.float64):
    rng = np.random.default_rng(2)
    return (Tensor(rng.standard_normal((B, 1, 8, 8)).astype(dtype)), rng.integers(0, 1000, B),
            np.array([3, 7, 0][:B]))


class Recorder:
    """A model that records what it was called with, and answers with its own arguments' mix."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], y.copy()))
        return self.model(x, t, y)


def test_guidance_zero_is_exactly_the_conditional_prediction():
    model = conditional_unet()
    x, t, y = inputs()
    with no_grad():
        np.testing.assert_array_equal(Guided(model, y, 0.0)(x, t).data, model(x, t, y).data)


@pytest.mark.parametrize("w", [0.5, 3.0])
def test_guided_eps_is_its_definition_from_one_call_on_the_doubled_batch(w):
    model = conditional_unet()
    x, t, y = inputs()
    recorder = Recorder(model)
    with no_grad():
        guided = Guided(recorder, y, w)(x, t).data
        conditional = model(x, t, y).data
        unconditional = model(x, t, np.full(3, NULL_LABEL)).data
    assert len(recorder.calls) == 1 and recorder.calls[0][0] == 6
    np.testing.assert_array_equal(recorder.calls[0][1], [3, 7, 0, NULL_LABEL, NULL_LABEL, NULL_LABEL])
    np.testing.assert_allclose(guided, (1 + w) * conditional - w * unconditional, rtol=1e-12, atol=1e-12)
    assert not np.allclose(conditional, unconditional), "the label must change the prediction"


def test_a_guided_sampler_calls_the_network_once_per_step():
    model = conditional_unet(np.float32)
    recorder = Recorder(model)
    d = GaussianDiffusion(linear_betas(1000))
    images = d.sample(Guided(recorder, np.array([1, 2]), 2.0), (2, 1, 8, 8), np.random.default_rng(0), steps=5)
    assert images.shape == (2, 1, 8, 8) and len(recorder.calls) == 5
    assert {batch for batch, _ in recorder.calls} == {4}


@pytest.mark.parametrize("w", [-0.1, float("nan"), float("inf")])
def test_guidance_weight_must_be_finite_and_not_negative(w):
    with pytest.raises(ValueError, match="guidance must be a finite number >= 0"):
        Guided(conditional_unet(), np.array([1]), w)


@pytest.mark.parametrize("n, expected", [
    (12, [0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
    (3, [0, 1, 2]),
    (20, sorted(list(range(10)) * 2)),
])
def test_all_labels_cover_the_digits_as_evenly_as_n_allows_in_order(n, expected):
    assert balanced_labels(n).tolist() == expected


def test_dropping_labels_replaces_them_by_the_null_label_at_the_rate_asked():
    labels = np.arange(10000) % 10
    rng = np.random.default_rng(0)
    assert (drop_labels(labels, 0.0, rng) == labels).all()
    assert (drop_labels(labels, 1.0, rng) == NULL_LABEL).all()
    dropped = drop_labels(labels, 0.1, rng)
    kept = dropped != NULL_LABEL
    assert (dropped[kept] == labels[kept]).all() and 0.09 < 1 - kept.mean() < 0.11


def test_label_embedding_gradient_matches_finite_differences():
    ids = np.array([2, 0, 2, 4])                      # a repeated id: its rows' gradients add up
    weight = Tensor(np.random.default_rng(0).standard_normal((5, 3)), requires_grad=True)
    layer = nn.Embedding(5, 3, dtype=np.float64)
    layer.weight = weight
    assert autograd.gradcheck(lambda w: layer(ids) * 1.0, [weight], mode="elements", **ELEMENT_TOL)
    weight.grad = None
    out = layer(ids)
    np.testing.assert_array_equal(out.data, weight.data[ids])
    out.backward(np.ones((4, 3)))
    np.testing.assert_array_equal(weight.grad[:, 0], [1, 0, 2, 0, 1])


def test_the_conditional_unet_gradient_reaches_only_the_rows_of_the_labels_given():
    model = conditional_unet()
    x, t, y = inputs()
    out = model(x, t, y)
    out.backward(np.random.default_rng(5).standard_normal(out.shape))
    rows = np.abs(model.label_emb.weight.grad).sum(axis=1)
    assert (rows[[0, 3, 7]] > 0).all() and (np.delete(rows, [0, 3, 7]) == 0).all()
    # and it is the right gradient: one element by central differences
    w = model.label_emb.weight
    u = np.random.default_rng(5).standard_normal(out.shape)
    analytic, eps = w.grad[3, 5], 1e-6

    def dot():
        with no_grad():
            return float((model(x, t, y).data * u).sum())
    w.data[3, 5] += eps
    plus = dot()
    w.data[3, 5] -= 2 * eps
    minus = dot()
    w.data[3, 5] += eps
    assert analytic == pytest.approx((plus - minus) / (2 * eps), rel=1e-5, abs=1e-8)


def test_labels_are_required_by_a_conditional_unet_and_refused_by_an_unconditional_one():
    x, t, y = inputs()
    with pytest.raises(ValueError, match="needs labels"):
        conditional_unet()(x, t)
    with pytest.raises(ValueError, match="without num_classes"):
        UNet(**MICRO, rng=np.random.default_rng(0), dtype=np.float64)(x, t, y)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 11\)"):
        conditional_unet()(x, t, np.array([1, 2, 11]))


def test_an_unconditional_unet_keeps_its_parameters():
    plain = [n for n, _ in UNet(**MICRO, rng=np.random.default_rng(0)).named_parameters()]
    conditional = [n for n, _ in UNet(**MICRO, num_classes=10, rng=np.random.default_rng(0)).named_parameters()]
    assert "label_emb.weight" not in plain and conditional == plain[:4] + ["label_emb.weight"] + plain[4:]
