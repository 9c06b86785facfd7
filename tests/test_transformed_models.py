"""Models as practitioners transform them: statically and dynamically quantized, built on the
meta device, in float16; and what the probe warns of, said again when its catalog is read
from the cache. Truth: plain torch with forward hooks."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.ao.quantization as tq
from torch import nn

import diagql
from diagql.errors import DiagQLError

N, D, K = 240, 8, 3


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g)
    return X, (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()


class Quantized(nn.Module):
    def __init__(self, dequantize: bool = True):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.fc1, self.relu, self.fc2 = nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, K)
        self.dequantize = dequantize

    def forward(self, x):
        z = self.fc2(self.relu(self.fc1(self.quant(x))))
        return self.dequant(z) if self.dequantize else z


def _static(dequantize: bool = True):
    torch.manual_seed(0)
    X, _ = _data()
    model = Quantized(dequantize).eval()
    model.qconfig = tq.get_default_qconfig("fbgemm" if "fbgemm" in
                                           torch.backends.quantized.supported_engines
                                           else "qnnpack")
    tq.prepare(model, inplace=True)
    model(X)
    return tq.convert(model, inplace=True)


def _outputs(model, module, X) -> np.ndarray:
    got = []
    handle = module.register_forward_hook(lambda m, i, o: got.append(o.dequantize()
                                                                      if o.is_quantized else o))
    with torch.no_grad():
        model(X)
    handle.remove()
    return got[0].double().numpy()


@pytest.mark.parametrize("dequantize", [True, False], ids=["dequant-stub", "quantized-out"])
def test_a_statically_quantized_models_layers_are_their_dequantized_values(dequantize):
    """Every layer whose output is a quantized tensor failed every query ("Creation of
    quantized tensor requires quantized dtype"): its values are its dequantized ones. A model
    whose output is quantized (no DeQuantStub) is read as scores the same way."""
    if not torch.backends.quantized.supported_engines:
        pytest.skip("this torch build has no quantized engine")
    model = _static(dequantize)
    X, y = _data()
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    fc1 = _outputs(model, model.fc1, X)
    np.testing.assert_allclose(db.query("AVG NEURONS IN fc1 WHERE class = 1").values,
                               fc1[y.numpy() == 1].mean(0), atol=1e-9)
    scores = _outputs(model, model.fc2, X)
    assert np.array_equal(db.profile.predictions, scores.argmax(1))
    # The quantized head is the final linear layer: its input is the latent.
    assert db.profile.latent_layer == "input of fc2"
    np.testing.assert_allclose(db.profile.latents, _inputs(model, model.fc2, X), atol=1e-6)


def _inputs(model, module, X) -> np.ndarray:
    got = []
    handle = module.register_forward_pre_hook(
        lambda m, args: got.append(args[0].dequantize() if args[0].is_quantized else args[0]))
    with torch.no_grad():
        model(X)
    handle.remove()
    return got[0].double().numpy()


def test_a_dynamically_quantized_head_is_still_the_final_linear_layer():
    """quantize_dynamic's Linear is no nn.Linear: the latent became the logits (5 dims),
    where every latent-space sampler then worked."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                          nn.Linear(16, K)).eval()
    quantized = tq.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    X, y = _data()
    db = diagql.connect(quantized, (X, y), cache_dir=False, progress=False)
    assert db.profile.latent_layer == "input of 4"
    np.testing.assert_allclose(db.profile.latents, _inputs(quantized, quantized[4], X),
                               atol=1e-6)


@pytest.mark.parametrize("latent", [None, "1"])
def test_a_model_on_the_meta_device_is_refused_until_it_has_weights(latent):
    """torch's own error named an operator with no meta kernel; loading the weights after
    connecting is a way too, a latent named to connect included (its bind at connect had
    run the meta model: GG2)."""
    torch.manual_seed(0)
    real = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, K)).eval()
    with torch.device("meta"):
        empty = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, K)).eval()
    X, y = _data()
    db = diagql.connect(empty, (X, y), cache_dir=False, progress=False, latent=latent)
    with pytest.raises(DiagQLError, match=r"the model is on the meta device, without values "
                                          r"\('0.weight' has none\): load its weights first"):
        db.query("SHOW LAYERS")
    empty.load_state_dict(real.state_dict(), assign=True)
    np.testing.assert_allclose(db.query("AVG NEURONS IN 1").values,
                               _outputs(real, real[1], X).mean(0), atol=1e-6)


def test_device_meta_is_refused_before_the_users_model_is_moved_there():
    """model.to('meta') had dropped the weights of the user's own trained model (sweep SY8)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, K)).eval()
    before = model[0].weight.detach().clone()
    with pytest.raises(DiagQLError, match="device 'meta' holds no values"):
        diagql.connect(model, _data(), device="meta", cache_dir=False, progress=False)
    assert model[0].weight.device.type == "cpu" and torch.equal(model[0].weight, before)


def test_one_float16_rounding_step_is_no_batch_dependence():
    """A float16 model's output alone and in a batch of three differed by one rounding step
    (1e-3 at 5.4, the dtype's epsilon), which was warned of as a batch dependence."""
    from diagql.model.repeatable import _differ

    a = torch.tensor([5.38671875, 1.0, -2.0], dtype=torch.float16)
    step = a.clone()
    step[0] = torch.nextafter(a[0:1], torch.tensor([10.0], dtype=torch.float16))[0]
    assert not _differ(a, step)
    assert _differ(a, a * 1.01)
    assert _differ(a.float(), step.float())  # the same step in float32 is no rounding


class _BatchCentred(nn.Module):
    """An item's output depends on its batch: each batch is centred on its own mean."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.head = nn.Linear(D, 6), nn.Linear(6, K)

    def forward(self, x):
        h = self.fc(x)
        return self.head(h - h.mean(0, keepdim=True))


def test_what_the_probe_warned_of_is_said_again_from_the_cache(tmp_path):
    """The probe's warning that outputs depend on the batch was given once: a later process
    read its catalog from the cache and answered with the same batch effect, unwarned."""
    X, y = _data()
    for _ in range(2):  # the second connection reads the catalog from the cache
        with pytest.warns(diagql.DiagQLWarning, match="other outputs when other items share "
                                                      "its batch"):
            db = diagql.connect(_BatchCentred(), (X, y), cache_dir=tmp_path, progress=False)
            db.query("SHOW LAYERS")
        db.close()
    with warnings.catch_warnings():  # a model without it: nothing said, computed or read
        warnings.simplefilter("error", diagql.DiagQLWarning)
        for _ in range(2):
            diagql.connect(nn.Sequential(nn.Linear(D, K)).eval(), (X, y), cache_dir=tmp_path,
                           progress=False).query("SHOW LAYERS")
