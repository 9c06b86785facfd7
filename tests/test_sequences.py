"""Sequence layers: RNNs, nn.TransformerEncoder and a tiny BERT (docs/ARCHITECTURE.md, "Data
model"). A neuron of a (batch, sequence, hidden) output is a hidden unit; an item's activation
of it is its mean over the item's real tokens (TOKENS MEAN), or its max, or one token, or every
(position, unit) with TOKENS ALL. The batch axis is found, never assumed (time-first outputs);
PackedSequence and nested outputs are unpacked with their lengths.

The truth is plain torch, computed here: each module's output is captured with a forward hook
(or the module is called directly) and reduced item by item, over the item's real tokens only.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.data import DataLoader, Dataset

import diagql
from diagql.engine.groups import cell_codes, n_cells
from diagql.errors import BindError, ExecutionError, ParseError
from diagql.evaluate.evaluation import forward_pass
from diagql.model.layers import LayerCatalog
from diagql.model.views import SEQUENCE, View
from tests import text_models as tm

TOL = dict(rtol=1e-5, atol=1e-5)

# --- the truth ------------------------------------------------------------------------------


def item_rows(values: torch.Tensor, lengths, mode: str = "mean", position: int = 0) -> np.ndarray:
    """(items, hidden) float64: each item's reduction over its first ``lengths[i]`` positions of
    ``values`` (items, sequence, hidden), one item at a time; lengths None: every position."""
    rows = []
    for i in range(len(values)):
        tokens = values[i, :values.shape[1] if lengths is None else int(lengths[i])].double()
        if mode == "mean":
            rows.append(tokens.mean(dim=0))
        elif mode == "max":
            rows.append(tokens.max(dim=0).values)
        else:
            rows.append(tokens[position])
    return torch.stack(rows).numpy()


def top(values: np.ndarray, k: int) -> list[int]:
    return np.argsort(-values, kind="stable")[:k].tolist()


def capture(model: nn.Module, names: list[str], *args, **kwargs) -> dict[str, torch.Tensor]:
    """The outputs of the named modules in one forward pass: the first tensor of a tuple, the
    last_hidden_state of a Hugging Face output, nested tensors padded with zeros."""
    outputs = {}
    modules = dict(model.named_modules())

    def keep(name):
        def hook(module, inputs, output):
            if isinstance(output, tuple):
                output = output[0]
            output = getattr(output, "last_hidden_state", output)
            if output.is_nested:
                output = torch.nested.to_padded_tensor(output, 0.0)
            outputs[name] = output.detach().clone()
        return hook

    handles = [modules[name].register_forward_hook(keep(name)) for name in names]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


# --- RNNs -----------------------------------------------------------------------------------

N, T, F, H, C = 45, 9, 5, 6, 3


class RNNClassifier(nn.Module):
    """An LSTM or GRU over (x, lengths); time-first when batch_first is False; ``packed``
    packs the padded batch with pack_padded_sequence (so ``rnn`` returns a PackedSequence)."""

    def __init__(self, cell=nn.LSTM, batch_first=True, packed=False, swallow=False):
        super().__init__()
        self.batch_first, self.packed, self.swallow = batch_first, packed, swallow
        self.rnn = cell(F, H, batch_first=batch_first)
        self.head = nn.Linear(H, C)

    def forward(self, x, lengths):
        try:
            return self._forward(x, lengths)
        except Exception:  # noqa: BLE001 - a model that hides its errors (swallow=True)
            if not self.swallow:
                raise
            return torch.zeros(len(x), C)

    def _forward(self, x, lengths):
        if not self.batch_first:
            x = x.transpose(0, 1)
        if self.packed:
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=self.batch_first,
                                          enforce_sorted=False)
            out, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=self.batch_first)
        else:
            out, _ = self.rnn(x)
        return self.head(out.sum(dim=1 if self.batch_first else 0))


class Pairs(Dataset):
    """Items ((x, length), y): collated, the input is a list that call_model spreads."""

    def __init__(self, *columns):
        self.columns = columns

    def __len__(self) -> int:
        return len(self.columns[-1])

    def __getitem__(self, i):
        return tuple(c[i] for c in self.columns[:-1]), self.columns[-1][i]


@pytest.fixture(scope="module")
def rnn_data():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(N, T, F, generator=g)
    lengths = torch.randint(2, T + 1, (N,), generator=g)
    lengths[0] = T  # the probe's first item is full length, so later batches are shorter
    y = torch.randint(0, C, (N,), generator=g)
    return X, lengths, y


def rnn_world(data, cell, batch_first, packed, **kwargs):
    X, lengths, y = data
    torch.manual_seed(0)
    model = RNNClassifier(cell, batch_first, packed, **kwargs).eval()
    conn = diagql.connect(model, Pairs(X, lengths, y), batch_size=7, cache_dir=False,
                          progress=False)
    with torch.no_grad():
        x = X if batch_first else X.transpose(0, 1)
        if packed:
            out, found = pad_packed_sequence(model.rnn(pack_padded_sequence(
                x, lengths, batch_first=batch_first, enforce_sorted=False))[0], batch_first=True)
            assert found.tolist() == lengths.tolist()
        else:
            out = model.rnn(x)[0]
            out = out if batch_first else out.transpose(0, 1)
    # Without packing the RNN sees every position, and no mask reaches it: all of them count.
    return model, conn, out, (lengths if packed else None), y.numpy()


RNN_CASES = [(cell, first, packed) for cell in (nn.LSTM, nn.GRU) for first in (True, False)
             for packed in (False, True)]


@pytest.mark.parametrize("cell,batch_first,packed", RNN_CASES,
                         ids=[f"{c.__name__}-{'bf' if b else 'tf'}-{'packed' if p else 'plain'}"
                              for c, b, p in RNN_CASES])
def test_rnn_neurons_are_hidden_units_averaged_over_each_items_tokens(rnn_data, cell,
                                                                        batch_first, packed):
    model, conn, out, lengths, y = rnn_world(rnn_data, cell, batch_first, packed)
    layer = conn.catalog["rnn"]
    assert layer.layout == SEQUENCE and layer.shape[-1] == H and layer.neurons == H
    assert layer.form == ("packed" if packed else "tensor")
    assert layer.batch_axis == (0 if batch_first or packed else 1)
    rows = item_rows(out, lengths)
    ones = np.flatnonzero(y == 1)
    avg = conn.query("AVG NEURONS IN rnn WHERE class = 1")
    assert avg.n_items == len(ones)  # not the sum of the lengths, nor time steps
    np.testing.assert_allclose(avg.values, rows[ones].mean(axis=0), **TOL)
    assert avg.labels == [f"rnn[{u}]" for u in range(H)]
    grouped = conn.query("TOPK 3 NEURONS IN rnn BY MAX GROUP BY class")
    for label, group in grouped.groups.items():
        mine = rows[y == label]
        assert group.n_items == len(mine)
        assert group.neurons.tolist() == top(mine.max(axis=0), 3)
        np.testing.assert_allclose(group.values, np.sort(mine.max(axis=0))[::-1][:3], **TOL)


def test_a_time_first_where_matching_one_item_counts_one_item(rnn_data):
    model, conn, out, lengths, y = rnn_world(rnn_data, nn.LSTM, False, False)
    best = int(np.argmax(conn.profile.confidence))
    highest = float(conn.profile.confidence[best])
    one = conn.query(f"AVG NEURONS IN rnn WHERE confidence >= {highest!r}")
    assert one.n_items == 1
    np.testing.assert_allclose(one.values, item_rows(out, None)[best], **TOL)
    rows = conn.query("DESCRIBE rnn").rows
    axes = dict(rows)["axes"]
    assert axes.startswith("batch: axis 1 of 3") and "batch_first agrees" in axes
    assert "sequence: axis 0 (length 9)" in axes and "hidden: axis 2 (6 units)" in axes


class LengthsLSTM(nn.Module):
    """forward(x, lengths), as classic LSTM classifiers are written: a time-first LSTM over
    the padded batch (not packed), its last real state gathered with the lengths."""

    def __init__(self):
        super().__init__()
        self.inp, self.rnn, self.head = nn.Linear(3, 5), nn.LSTM(5, 6), nn.Linear(6, 3)

    def forward(self, x, lengths):
        out, _ = self.rnn(self.inp(x).transpose(0, 1))
        return self.head(out[lengths - 1, torch.arange(len(x))])


def _pad_items(batch):
    longest = max(len(item["x"]) for item in batch)
    x = torch.zeros(len(batch), longest, 3)
    for i, item in enumerate(batch):
        x[i, :len(item["x"])] = item["x"]
    return {"x": x, "lengths": torch.stack([item["lengths"] for item in batch]),
            "label": torch.stack([item["label"] for item in batch])}


def test_lengths_given_to_the_model_mark_its_real_steps():
    """A model that takes each item's length, not an attention_mask: the padded steps of its
    LSTM and input projection had counted in TOKENS MEAN (7-11% off), unmarked."""
    g = torch.Generator().manual_seed(3)
    items = []
    for i in range(120):
        n = int(torch.randint(2, 9, (1,), generator=g))
        items.append({"x": torch.randn(n, 3, generator=g), "lengths": torch.tensor(n),
                      "label": torch.tensor(i % 3)})
    torch.manual_seed(0)
    model = LengthsLSTM().eval()
    loader = DataLoader(items, batch_size=16, collate_fn=_pad_items)
    conn = diagql.connect(model, loader, cache_dir=False, progress=False)
    with torch.no_grad():  # each item alone, unpadded
        steps = [model.rnn(model.inp(item["x"])[:, None])[0][:, 0] for item in items]
        projected = [model.inp(item["x"]) for item in items]
    mean = torch.stack([s.mean(0) for s in steps]).double().mean(0).numpy()
    last = torch.stack([s[-1] for s in steps]).double().mean(0).numpy()
    np.testing.assert_allclose(conn.query("AVG NEURONS IN rnn").values, mean, **TOL)
    np.testing.assert_allclose(conn.query("AVG NEURONS IN rnn TOKEN -1").values, last, **TOL)
    np.testing.assert_allclose(conn.query("AVG NEURONS IN inp").values,
                               torch.stack([p.mean(0) for p in projected]).double().mean(0)
                               .numpy(), **TOL)
    assert dict(conn.query("DESCRIBE rnn").rows)["real tokens"] == \
        "the lengths of the batch input"


def test_packed_rnn_reductions_sample_and_baseline(rnn_data):
    model, conn, out, lengths, y = rnn_world(rnn_data, nn.LSTM, False, True)
    for clause, mode, position in (("TOKENS MAX", "max", 0), ("TOKEN 0", "token", 0)):
        result = conn.query(f"AVG NEURONS IN rnn {clause} WHERE class = 2")
        twos = np.flatnonzero(y == 2)
        np.testing.assert_allclose(result.values,
                                   item_rows(out, lengths, mode, position)[twos].mean(axis=0),
                                   **TOL)
    # TOKEN -1 is each item's last real token: its own length's, not the batch's longest.
    last = np.stack([out[i, int(lengths[i]) - 1].double().numpy() for i in range(N)])
    np.testing.assert_allclose(conn.query("AVG NEURONS IN rnn TOKEN -1").values,
                               last.mean(axis=0), **TOL)
    rows = item_rows(out, lengths)
    argmax = conn.query("ARGMAX NEURONS IN rnn")
    np.testing.assert_allclose(argmax.values, np.bincount(rows.argmax(axis=1), minlength=H) / N,
                               **TOL)
    sample = conn.sample("random(0.5, random_state=4)")
    answer = conn.query("TOPK 4 NEURONS IN rnn USING SAMPLE random(0.5, random_state=4) "
                        "WITH BASELINE")
    # rnn's mean over tokens is the latent: the profile holds it, the answer is every item's
    assert answer.estimate.exact and answer.estimate.n == len(sample) and answer.n_items == N
    assert answer.neurons.tolist() == top(rows.mean(axis=0), 4)
    assert answer.baseline.neurons.tolist() == top(rows.mean(axis=0), 4)
    np.testing.assert_allclose(answer.baseline.values, np.sort(rows.mean(axis=0))[::-1][:4],
                               **TOL)


def test_tokens_all_keeps_positions_of_one_length_and_is_refused_for_packed(rnn_data):
    model, conn, out, lengths, y = rnn_world(rnn_data, nn.GRU, False, False)
    every = conn.query("AVG NEURONS IN rnn TOKENS ALL")
    np.testing.assert_allclose(every.values, out.reshape(N, T * H).double().mean(dim=0).numpy(),
                               **TOL)
    assert every.labels[:2] == ["rnn[0,0]", "rnn[0,1]"] and every.labels[-1] == f"rnn[{T-1},{H-1}]"
    model, conn, out, lengths, y = rnn_world(rnn_data, nn.GRU, True, True)
    with pytest.raises(BindError, match="TOKENS ALL needs one sequence length.*packed"):
        conn.query("AVG NEURONS IN rnn TOKENS ALL")
    with pytest.raises(ExecutionError, match=r"TOKEN 5 is past the end of an item with 2 real "
                                             r"tokens .*'rnn': .* n runs from -2 to 1 for it; "
                                             r"TOKEN -1 reads each item's last"):
        conn.query("AVG NEURONS IN rnn TOKEN 5")


def test_an_error_in_diagqls_hook_code_is_never_the_models(rnn_data):
    # The model swallows every Exception of its forward: the hook's error still surfaces.
    model, conn, out, lengths, y = rnn_world(rnn_data, nn.LSTM, True, True, swallow=True)
    with pytest.raises(ExecutionError, match="TOKEN 5 is past the end"):
        conn.query("AVG NEURONS IN rnn TOKEN 5")

    class Broken:
        view = View(conn.catalog["rnn"])
        items = wanted = np.arange(5)

        def take(self, rows, idx):
            raise RuntimeError("The size of tensor a (640) must match (832)")

    with pytest.raises(ExecutionError) as caught:
        conn.runner().run([Broken()], "broken")
    message = str(caught.value)
    assert "model's forward raised" not in message
    assert "layer 'rnn'" in message and "DiagQL's, not the model's" in message
    assert "RuntimeError" in message and "PackedSequence" in message


def test_clauses_that_do_not_fit_the_layer_are_refused(rnn_data):
    model, conn, out, lengths, y = rnn_world(rnn_data, nn.LSTM, True, False)
    with pytest.raises(BindError, match="TOKEN 0 applies to sequence layers.*'head'"):
        conn.query("AVG NEURONS IN head TOKEN 0")
    with pytest.raises(BindError, match="'rnn' is a sequence.*CHANNELS applies to conv maps"):
        conn.query("AVG CHANNELS IN rnn")
    with pytest.raises(BindError, match=r"TOKEN 9 is past the 9 positions of layer 'rnn'"):
        conn.query("AVG NEURONS IN rnn TOKEN 9")
    with pytest.raises(ParseError, match="TOKEN takes a whole number"):
        conn.query("AVG NEURONS IN rnn TOKEN 1.5")


# --- nn.TransformerEncoder --------------------------------------------------------------------

D, S = 8, 7


class Encoder(nn.Module):
    """proj -> nn.TransformerEncoder (2 layers) -> head on the first token."""

    def __init__(self, batch_first: bool, use_mask: bool):
        super().__init__()
        self.batch_first, self.use_mask = batch_first, use_mask
        self.proj = nn.Linear(4, D)
        layer = nn.TransformerEncoderLayer(D, 2, 16, batch_first=batch_first, dropout=0.1)
        # Nested tensors (the fast path of padded batches) need batch_first.
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=batch_first)
        self.head = nn.Linear(D, C)

    def forward(self, x, padding):
        h = self.proj(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.enc(h, src_key_padding_mask=padding if self.use_mask else None)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h[:, 0])


ENCODER_CASES = [(first, mask) for first in (True, False) for mask in (True, False)]


@pytest.mark.parametrize("batch_first,use_mask", ENCODER_CASES,
                         ids=[f"{'bf' if b else 'tf'}-{'mask' if m else 'nomask'}"
                              for b, m in ENCODER_CASES])
def test_transformer_encoder_layers_leave_padding_out(batch_first, use_mask):
    g = torch.Generator().manual_seed(5)
    n = 40
    X = torch.randn(n, S, 4, generator=g)
    lengths = torch.randint(2, S + 1, (n,), generator=g)
    padding = torch.arange(S)[None, :] >= lengths[:, None]
    y = torch.randint(0, C, (n,), generator=g)
    torch.manual_seed(1)
    model = Encoder(batch_first, use_mask).eval()
    names = ["enc", "enc.layers.0", "enc.layers.1.linear1"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's nested tensors are a "prototype"
        conn = diagql.connect(model, Pairs(X, padding, y), batch_size=6, cache_dir=False,
                              progress=False)
        outputs = capture(model, names, X, padding)
        truth = {}
        for name in names:
            out = outputs[name]
            if out.shape[0] != n:  # time-first
                out = out.transpose(0, 1)
            truth[name] = item_rows(out, lengths if use_mask else None)
        for name in names:
            layer = conn.catalog[name]
            assert layer.layout == SEQUENCE
            np.testing.assert_allclose(conn.query(f"AVG NEURONS IN {name}").values,
                                       truth[name].mean(axis=0), **TOL)
        out = outputs["enc"] if batch_first else outputs["enc"].transpose(0, 1)
        top_max = conn.query("TOPK 3 NEURONS IN enc TOKENS MAX WHERE class = 0")
    zeros = np.flatnonzero(y.numpy() == 0)
    maxima = item_rows(out, lengths if use_mask else None, "max")[zeros].mean(axis=0)
    assert top_max.neurons.tolist() == top(maxima, 3)
    assert conn.catalog["enc"].batch_axis == (0 if batch_first else 1)
    if use_mask:
        assert conn.catalog["enc"].mask == "the src_key_padding_mask given to enc"
    if conn.catalog["enc.layers.0"].form == "nested":  # torch's fast path: the way out is said
        with pytest.raises(BindError, match="TOKENS ALL needs one sequence length.*nested.*"
                                            "enable_nested_tensor=False"):
            conn.query("AVG NEURONS IN enc.layers.0 TOKENS ALL")


class Seq2Seq(nn.Module):
    """nn.Transformer as a classifier over (source, target) pairs of one padded length, as a
    translation-quality model would be: cross-attention's mask is the source's."""

    def __init__(self, source_mask: bool):
        super().__init__()
        self.source_mask = source_mask
        self.embed = nn.Linear(4, 8)
        self.tr = nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, C)

    def forward(self, src, tgt, src_pad, tgt_pad):
        memory_pad = src_pad if self.source_mask else None
        out = self.tr(self.embed(src), self.embed(tgt), src_key_padding_mask=memory_pad,
                      tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=memory_pad)
        return self.head(out[:, 0])


@pytest.mark.parametrize("source_mask", [True, False])
def test_an_encoder_decoders_layers_read_their_own_sequences_padding(source_mask):
    """A decoder's cross-attention had been averaged over the source's real positions (its
    key_padding_mask covers the keys, its output has one row per target position), and with no
    source mask the encoder's layers over the target's (nn.Transformer's tgt_key_padding_mask
    reached them)."""
    g = torch.Generator().manual_seed(11)
    n = 30
    src, tgt = torch.randn(n, S, 4, generator=g), torch.randn(n, S, 4, generator=g)
    src_len = torch.randint(2, S + 1, (n,), generator=g)
    tgt_len = torch.randint(2, S + 1, (n,), generator=g)
    src_pad = torch.arange(S)[None, :] >= src_len[:, None]
    tgt_pad = torch.arange(S)[None, :] >= tgt_len[:, None]
    y = torch.randint(0, C, (n,), generator=g)
    torch.manual_seed(2)
    model = Seq2Seq(source_mask).eval()
    layers = {"tr.decoder.layers.0.multihead_attn": tgt_len,
              "tr.decoder.layers.0.linear1": tgt_len,
              "tr.encoder.layers.0.linear1": src_len if source_mask else None,
              "tr.encoder": src_len if source_mask else None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's nested tensors are a "prototype"
        conn = diagql.connect(model, Pairs(src, tgt, src_pad, tgt_pad, y), batch_size=7,
                              cache_dir=False, progress=False)
        outputs = capture(model, list(layers), src, tgt, src_pad, tgt_pad)
        for name, lengths in layers.items():
            truth = item_rows(outputs[name], lengths).mean(axis=0)
            np.testing.assert_allclose(conn.query(f"AVG NEURONS IN {name}").values, truth,
                                       **TOL)
    assert conn.catalog["tr.decoder.layers.0.multihead_attn"].mask == \
        "the tgt_key_padding_mask given to tr.decoder.layers.0"


class _HFSeq2Seq(nn.Module):
    """A Hugging Face encoder-decoder's forward: input_ids with attention_mask for the
    encoder, decoder_input_ids with decoder_attention_mask for the decoder and the head."""

    def __init__(self, decoder_mask: bool):
        super().__init__()
        torch.manual_seed(3)
        self.decoder_mask = decoder_mask
        self.encoder = nn.ModuleDict({"embed": nn.Embedding(20, 8), "proj": nn.Linear(8, 8)})
        self.decoder = nn.ModuleDict({"embed": nn.Embedding(20, 8), "proj": nn.Linear(8, 8)})
        self.lm_head = nn.Linear(8, C)

    def forward(self, input_ids, attention_mask, decoder_input_ids,
                decoder_attention_mask=None):
        memory = self.encoder["proj"](self.encoder["embed"](input_ids))
        context = (memory * attention_mask[..., None]).sum(1, keepdim=True)
        hidden = self.decoder["proj"](self.decoder["embed"](decoder_input_ids) + context)
        return self.lm_head(hidden)[:, 0]


@pytest.mark.parametrize("decoder_mask", [True, False])
@pytest.mark.parametrize("target_length", [S, S - 2])
def test_a_decoders_layers_read_the_decoder_attention_mask(decoder_mask, target_length):
    """A T5's decoder layers were averaged over the encoder's real tokens where the two
    lengths agree (the input's attention_mask fits their shape), and over every position
    where they do not; they take decoder_attention_mask, every position without one."""
    g = torch.Generator().manual_seed(5)
    n = 40
    src_len = torch.randint(2, S + 1, (n,), generator=g)
    tgt_len = torch.randint(1, target_length + 1, (n,), generator=g)
    ids = torch.randint(1, 20, (n, S), generator=g)
    mask = (torch.arange(S)[None, :] < src_len[:, None]).long()
    dec_ids = torch.randint(1, 20, (n, target_length), generator=g)
    dec_mask = (torch.arange(target_length)[None, :] < tgt_len[:, None]).long()
    items = [{"input_ids": ids[i], "attention_mask": mask[i], "decoder_input_ids": dec_ids[i],
              **({"decoder_attention_mask": dec_mask[i]} if decoder_mask else {}),
              "labels": i % C} for i in range(n)]
    model = _HFSeq2Seq(decoder_mask).eval()
    conn = diagql.connect(model, items, batch_size=7, cache_dir=False, progress=False)
    layers = {"encoder.proj": src_len, "decoder.proj": tgt_len if decoder_mask else None,
              "lm_head": tgt_len if decoder_mask else None}
    outputs = {}
    handles = [dict(model.named_modules())[name].register_forward_hook(
        lambda m, i, o, name=name: outputs.__setitem__(name, o)) for name in layers]
    with torch.no_grad():
        model(ids, mask, dec_ids, dec_mask if decoder_mask else None)
    for handle in handles:
        handle.remove()
    for name, lengths in layers.items():
        truth = item_rows(outputs[name], lengths).mean(axis=0)
        np.testing.assert_allclose(conn.query(f"AVG NEURONS IN {name}").values, truth, **TOL)
    latent = item_rows(outputs["decoder.proj"], layers["decoder.proj"])
    np.testing.assert_allclose(conn.profile.latents, latent, **TOL)
    if decoder_mask:
        assert conn.catalog["decoder.proj"].mask == \
            "the decoder_attention_mask of the batch input"


def _seq2seq_data(n: int, seed: int, shortest_target: int) -> tuple[dict, torch.Tensor,
                                                                   torch.Tensor]:
    """An encoder-decoder's batch of ``n`` items, both inputs padded to S (their ids 0 past
    each item's length): the mapping, the source lengths and the target lengths."""
    g = torch.Generator().manual_seed(seed)
    src_len = torch.randint(2, S + 1, (n,), generator=g)
    tgt_len = torch.randint(shortest_target, S + 1, (n,), generator=g)
    mask = (torch.arange(S)[None, :] < src_len[:, None]).long()
    dec_mask = (torch.arange(S)[None, :] < tgt_len[:, None]).long()
    ids = torch.randint(1, 20, (n, S), generator=g) * mask
    dec_ids = torch.randint(1, 20, (n, S), generator=g) * dec_mask
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec_ids,
            "decoder_attention_mask": dec_mask, "labels": torch.arange(n) % C}, src_len, tgt_len


class _SharedEmbedding(nn.Module):
    """T5's and Bart's layout: one embedding (``shared``, also ``encoder.embed_tokens`` and
    ``decoder.embed_tokens``) called by the encoder on input_ids, then by the decoder."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.shared = nn.Embedding(20, 8, padding_idx=0)
        self.encoder = nn.ModuleDict({"embed_tokens": self.shared, "proj": nn.Linear(8, 8)})
        self.decoder = nn.ModuleDict({"embed_tokens": self.shared, "proj": nn.Linear(8, 8)})
        self.lm_head = nn.Linear(8, C)

    def forward(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask):
        memory = self.encoder["proj"](self.encoder["embed_tokens"](input_ids.view(-1, S)))
        context = (memory * attention_mask[..., None]).sum(1, keepdim=True)
        hidden = self.decoder["proj"](self.decoder["embed_tokens"](decoder_input_ids) + context)
        real = decoder_attention_mask[..., None]
        return self.lm_head((hidden * real).sum(1) / real.sum(1))


def test_a_shared_embeddings_encoder_call_reads_the_encoders_mask():
    """The embedding both stacks call is outside the encoder by name, so both its calls had
    been averaged over the decoder's real tokens: its encoder call's TOKENS MEAN 0.02-0.07 off
    where both inputs are padded to one length, unwarned. Its call on input_ids reads
    attention_mask, its call on decoder_input_ids decoder_attention_mask."""
    data, src_len, tgt_len = _seq2seq_data(60, seed=6, shortest_target=2)
    ids, dec_ids = data["input_ids"], data["decoder_input_ids"]
    model = _SharedEmbedding().eval()
    conn = diagql.connect(model, data, batch_size=7, cache_dir=False, progress=False)
    with torch.no_grad():
        enc, dec = model.shared(ids), model.shared(dec_ids)
    for name, rows, lengths in [("shared#1", enc, src_len), ("encoder.embed_tokens#1", enc,
                                                               src_len),
                                ("shared#2", dec, tgt_len), ("decoder.embed_tokens#2", dec,
                                                               tgt_len)]:
        np.testing.assert_allclose(conn.query(f"AVG NEURONS IN {name}").values,
                                   item_rows(rows, lengths).mean(axis=0), **TOL, err_msg=name)
    assert conn.catalog["shared#1"].mask == "the attention_mask of the batch input"
    assert conn.catalog["shared#2"].mask == "the decoder_attention_mask of the batch input"


class _Wrapped(nn.Module):
    """A seq2seq model inside a wrapper, as a user wraps a Hugging Face model to return its
    first token's logits: the inner model's own forward takes both inputs' ids."""

    def __init__(self):
        super().__init__()
        self.m = _HFSeq2Seq(True)

    def forward(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask):
        return self.m(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)


def test_a_wrapped_seq2seqs_head_reads_the_decoders_mask():
    """The inner model is called on input_ids first, so every module it calls had been taken
    for the encoder's tokens: its LM head, over the decoder's states, was averaged over the
    encoder's attention_mask (0.04-0.47 off, unwarned, where both are padded to one length).
    A module called on both inputs' ids passes neither on; the head follows the decoder."""
    data, src_len, tgt_len = _seq2seq_data(40, seed=7, shortest_target=1)
    model = _Wrapped().eval()
    conn = diagql.connect(model, data, batch_size=7, cache_dir=False, progress=False)
    outputs = {}
    handles = [dict(model.named_modules())[name].register_forward_hook(
        lambda m, i, o, name=name: outputs.__setitem__(name, o))
        for name in ("m.encoder.proj", "m.decoder.proj", "m.lm_head")]
    with torch.no_grad():
        model(*(data[key] for key in ("input_ids", "attention_mask", "decoder_input_ids",
                                      "decoder_attention_mask")))
    for handle in handles:
        handle.remove()
    for name, lengths in (("m.encoder.proj", src_len), ("m.decoder.proj", tgt_len),
                          ("m.lm_head", tgt_len)):
        truth = item_rows(outputs[name], lengths).mean(axis=0)
        np.testing.assert_allclose(conn.query(f"AVG NEURONS IN {name}").values, truth, **TOL,
                                   err_msg=name)
    assert conn.catalog["m.lm_head"].mask == "the decoder_attention_mask of the batch input"


# --- a channel-first map is not a sequence -------------------------------------------------------


class Proj(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)

    def forward(self, x):
        return self.lin(x.transpose(1, 2))  # (batch, length, 5): a sequence


class ConvText(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3)
        self.act = nn.ReLU(inplace=True)
        self.block = nn.Sequential(nn.Conv1d(6, 6, 3, padding=1), nn.BatchNorm1d(6))
        self.gelu = nn.GELU()
        self.proj = Proj()
        self.head = nn.Linear(5, C)

    def forward(self, x):
        return self.head(self.proj(self.gelu(self.block(self.act(self.conv(x))))).mean(dim=1))


class _Unmasked(nn.Module):
    """Sums its embeddings and divides by the lengths it is given: no padding mask reaches
    its embedding layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 4, padding_idx=0)
        self.head = nn.Linear(4, 2)

    def forward(self, input_ids, n_tokens):
        return self.head(self.embed(input_ids).sum(1) / n_tokens[:, None])


def _ragged_ids() -> list:
    """40 items (token ids of 2 to 16 tokens, a label), for a collate that pads per batch."""
    torch.manual_seed(0)
    return [(torch.randint(1, 20, (2 + (i * 7) % 15,)), torch.tensor(i % 2)) for i in range(40)]


def _pad_ids(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids padded with 0 to the batch's longest item, each item's length, the labels)."""
    ids = torch.zeros(len(batch), max(len(s) for s, _ in batch), dtype=torch.long)
    for i, (s, _) in enumerate(batch):
        ids[i, :len(s)] = s
    return ids, torch.tensor([len(s) for s, _ in batch]), torch.stack([y for _, y in batch])


def test_padding_per_batch_with_no_mask_to_leave_it_out_is_warned_of():
    """Its padding counts as tokens, so an item's mean depends on its batch's longest item."""
    items = _ragged_ids()

    def collate(batch, key="n_tokens"):
        ids, lengths, y = _pad_ids(batch)
        return {"input_ids": ids, key: lengths}, y

    db = diagql.connect(_Unmasked().eval(), DataLoader(items, collate_fn=collate), progress=False)
    with pytest.warns(diagql.DiagQLWarning, match="layer 'embed': its sequence length changes "
                                                  "with the batch .* padding counts as tokens"):
        db.query("AVG NEURONS IN embed TOKEN 0")
    with warnings.catch_warnings():
        warnings.simplefilter("error", diagql.DiagQLWarning)
        db.query("AVG NEURONS IN head")


class _Lengths(_Unmasked):
    def forward(self, input_ids, lengths):
        return super().forward(input_ids, lengths)


def test_lengths_the_model_takes_leave_padding_per_batch_out():
    """The same model taking `lengths` (a name models give them): its real tokens are below
    each length, so its embedding's mean is each item's own, in any batch, unwarned."""
    items = _ragged_ids()

    def collate(batch):
        ids, lengths, y = _pad_ids(batch)
        return {"input_ids": ids, "lengths": lengths}, y

    model = _Lengths().eval()
    db = diagql.connect(model, DataLoader(items, collate_fn=collate), progress=False)
    with torch.no_grad():
        own = torch.stack([model.embed(ids).mean(0) for ids, _ in items]).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error", diagql.DiagQLWarning)
        np.testing.assert_allclose(db.query("AVG NEURONS IN embed").values, own.mean(0).numpy(),
                                   **TOL)
        ones = db.query("AVG NEURONS IN embed WHERE class = 1").values
    np.testing.assert_allclose(ones, own[1::2].mean(0).numpy(), **TOL)


class _MaskedBlock(nn.Module):
    """An embedding, a per-token block (a layer inside it), the mean over the real tokens
    that ``attention_mask`` marks, read by the head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(17)
        self.embed = nn.Embedding(20, 4, padding_idx=0)
        self.block = nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 6))
        self.head = nn.Linear(6, 2)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).float()
        return self.head((self.block(self.embed(input_ids)) * mask).sum(1) / mask.sum(1))


def test_a_sequence_block_padded_per_batch_keeps_its_projections():
    """Data padded per batch (a sequence's length changes with the batch): the block's token
    views are rows of its hidden units all the same, so the profile keeps its projections. It
    had kept none for such data (a BERT's and a GPT-2's layers), and a layer inside a block
    was fitted on the latent alone. Here the block's 6 units are spanned: a sample's mean is
    every matching item's own masked mean (plain torch), and block.0 is fitted on the block."""
    torch.manual_seed(1)
    items = [(torch.randint(1, 20, (2 + (i * 7) % 15,)), torch.tensor(i % 2)) for i in range(300)]

    def collate(batch):
        ids, lengths, y = _pad_ids(batch)
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        return {"input_ids": ids, "attention_mask": mask}, y

    model = _MaskedBlock().eval()
    db = diagql.connect(model, DataLoader(items, batch_size=32, collate_fn=collate),
                        cache_dir=False, progress=False)
    assert db.catalog["block"].varies
    assert "block" in {name for _, name in db.profile.auxiliaries.names}
    with torch.no_grad():
        own = torch.stack([model.block(model.embed(ids)).mean(0) for ids, _ in items]).double()
    answer = db.query("AVG NEURONS IN block WHERE class = 1 USING SAMPLE random(0.1)")
    assert answer.estimate.exact
    np.testing.assert_allclose(answer.values, own[1::2].mean(0).numpy(), rtol=1e-5, atol=1e-6)
    inner = db.query("AVG NEURONS IN block.0 WHERE class = 1 USING SAMPLE random(0.1)")
    assert inner.plan.neighbour == "block"


def test_a_sequence_block_whose_padding_counts_keeps_no_projections():
    """Padded per batch with no mask reaching the block: its rows depend on which items share
    a batch, so there is no exact answer to rebuild (the profile pass's batches had answered
    0.1059 where USING FULL's, over the matching items' own batches, answers 0.0960)."""
    items = _ragged_ids() * 5

    def collate(batch):
        ids, _, y = _pad_ids(batch)
        return {"input_ids": ids}, y

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(18)
            self.embed = nn.Embedding(20, 4)
            self.block = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
            self.head = nn.Linear(6, 2)

        def forward(self, input_ids):
            return self.head(self.block(self.embed(input_ids)).mean(1))

    db = diagql.connect(Block().eval(), DataLoader(items, batch_size=16, collate_fn=collate),
                        cache_dir=False, progress=False)
    assert db.catalog["block"].batch_padded
    assert "block" not in {name for _, name in db.profile.auxiliaries.names}
    with pytest.warns(diagql.DiagQLWarning, match="its padding counts as tokens"):
        answer = db.query("AVG NEURONS IN block.0 WHERE class = 1 USING SAMPLE random(0.2)")
    assert not answer.estimate.exact


class _TextConv(nn.Module):
    """Token ids (batch, length) through a Conv1d over (batch, channels, length): no mask."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 4, padding_idx=0)
        self.conv = nn.Conv1d(4, 3, 3, padding=1)
        self.head = nn.Linear(3, 2)

    def forward(self, ids):
        return self.head(self.conv(self.embed(ids).transpose(1, 2)).mean(dim=2))


def test_a_conv_maps_channels_over_data_padded_per_batch_are_warned_of():
    """A Conv1d over text padded to each batch's longest item: each channel's mean counts
    the padded positions, so the answer changed with the batch size (0.128 at 4, 0.122 at
    64) unwarned, where a sequence layer's was warned of. The answer is the padded batches'
    (plain torch over the same batches of 4)."""
    items = _ragged_ids()

    def collate(batch):
        ids, _, y = _pad_ids(batch)
        return ids, y

    model = _TextConv().eval()
    loader = DataLoader(items, batch_size=4, collate_fn=collate)
    db = diagql.connect(model, loader, cache_dir=False, progress=False)
    with pytest.warns(diagql.DiagQLWarning, match="layer 'conv': its length changes with the "
                                                  "batch .* counts the padded positions"):
        answer = db.query("AVG CHANNELS IN conv")
    with torch.no_grad():
        want = torch.cat([model.conv(model.embed(ids).transpose(1, 2)).double().mean(dim=2)
                          for ids, _ in loader]).mean(dim=0).numpy()
    np.testing.assert_allclose(answer.values, want, **TOL)
    with pytest.raises(BindError, match="neurons are not fixed; CHANNELS averages"):
        db.query("AVG NEURONS IN conv")
    with pytest.raises(BindError, match=r"neurons are not fixed \(line"):  # SIMILARITY: no
        db.query("SIMILARITY conv, head")  # CHANNELS to suggest


def test_channel_first_maps_keep_flat_neurons_and_channels():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(30, 4, 10, generator=g)
    y = torch.randint(0, C, (30,), generator=g)
    torch.manual_seed(0)
    model = ConvText().eval()
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    layouts = {name: conn.catalog[name].layout for name in ("conv", "act", "block", "gelu",
                                                             "proj", "proj.lin")}
    assert layouts == {"conv": "flat", "act": "flat", "block": "flat", "gelu": "flat",
                       "proj": "sequence", "proj.lin": "sequence"}
    with torch.no_grad():
        conv = model.conv(X)
    np.testing.assert_allclose(conn.query("AVG CHANNELS IN conv").values,
                               conv.double().mean(dim=(0, 2)).numpy(), **TOL)
    neurons = conn.query("TOPK 3 NEURONS IN conv")
    flat = conv.reshape(30, -1).double().mean(dim=0).numpy()
    assert neurons.neurons.tolist() == top(flat, 3)
    assert neurons.labels[0] == "conv[{},{}]".format(*np.unravel_index(top(flat, 1)[0], (6, 8)))
    with pytest.raises(BindError, match="TOKENS MAX applies to sequence layers"):
        conn.query("AVG NEURONS IN block TOKENS MAX")


# --- a tiny BERT over mapping inputs, padded per batch -------------------------------------------

BERT_LAYERS = ["bert", "bert.encoder.layer.0", "bert.encoder.layer.1",
               "bert.encoder.layer.1.intermediate"]


@pytest.fixture(scope="module")
def bert_world(tmp_path_factory):
    model = tm.tiny_bert()
    sequences, labels = tm.token_data()
    data = DataLoader(tm.DictDataset(sequences, labels), batch_size=8, collate_fn=tm.pad_collate)
    conn = diagql.connect(model, data, batch_size=5, progress=False,
                          cache_dir=tmp_path_factory.mktemp("bert-cache"))
    conn.execute("SET estimator = plain")  # sample answers here are compared with sample means
    # Each item alone, unpadded: its real tokens' outputs, which padding must not change.
    per_item = {name: [] for name in BERT_LAYERS}
    for sequence in sequences:
        outputs = capture(model, BERT_LAYERS, input_ids=sequence[None],
                          attention_mask=torch.ones(1, len(sequence), dtype=torch.int64))
        for name in BERT_LAYERS:
            per_item[name].append(outputs[name][0])
    return model, conn, sequences, per_item, labels.numpy()


def bert_rows(per_item, name, mode="mean", position=0) -> np.ndarray:
    rows = []
    for tokens in per_item[name]:
        tokens = tokens.double()
        rows.append({"mean": lambda: tokens.mean(dim=0), "max": lambda: tokens.max(dim=0).values,
                     "token": lambda: tokens[position]}[mode]())
    return torch.stack(rows).numpy()


def test_bert_sequence_layers_over_dynamic_padding(bert_world):
    model, conn, sequences, per_item, y = bert_world
    lengths = [len(s) for s in sequences]
    # The premise: the batches of 5 are padded to different lengths.
    assert len({max(lengths[i:i + 5]) for i in range(0, len(lengths), 5)}) > 1
    layer1 = bert_rows(per_item, "bert.encoder.layer.1")
    ones = np.flatnonzero(y == 1)
    avg = conn.query("AVG NEURONS IN bert.encoder.layer.1 WHERE class = 1")
    assert avg.n_items == len(ones) and avg.labels[0] == "bert.encoder.layer.1[0]"
    np.testing.assert_allclose(avg.values, layer1[ones].mean(axis=0), **TOL)
    layer0 = bert_rows(per_item, "bert.encoder.layer.0")
    grouped = conn.query("TOPK 4 NEURONS IN bert.encoder.layer.0 BY MAX GROUP BY class")
    for label, group in grouped.groups.items():
        assert group.neurons.tolist() == top(layer0[y == label].max(axis=0), 4)
    inner = bert_rows(per_item, "bert.encoder.layer.1.intermediate")
    argmax = conn.query("ARGMAX NEURONS IN bert.encoder.layer.1.intermediate")
    np.testing.assert_allclose(argmax.values,
                               np.bincount(inner.argmax(axis=1), minlength=32) / len(y), **TOL)
    last = bert_rows(per_item, "bert")
    sample = conn.sample("random(0.5, random_state=2)")
    answer = conn.query("TOPK 5 NEURONS IN bert USING SAMPLE random(0.5, random_state=2) "
                        "WITH BASELINE")
    assert answer.neurons.tolist() == top(last[sample].mean(axis=0), 5)
    np.testing.assert_allclose(answer.values, np.sort(last[sample].mean(axis=0))[::-1][:5], **TOL)
    assert answer.baseline.neurons.tolist() == top(last.mean(axis=0), 5)


def test_bert_token_reductions_and_their_own_cached_rows(bert_world):
    model, conn, sequences, per_item, y = bert_world
    name = "bert.encoder.layer.1"
    spec = "random(0.6, random_state=9)"
    sample = conn.sample(spec)
    # Rows are cached per layer AND reduction: TOKEN 0 after TOKENS MEAN on the same sample
    # must not be answered from the mean rows.
    for clause, mode, position in (("", "mean", 0), ("TOKEN 0", "token", 0),
                                   ("TOKENS MAX", "max", 0), ("TOKEN -1", "token", -1),
                                   ("TOKEN 0", "token", 0)):
        result = conn.query(f"AVG NEURONS IN {name} {clause} USING SAMPLE {spec}")
        np.testing.assert_allclose(result.values,
                                   bert_rows(per_item, name, mode, position)[sample].mean(axis=0),
                                   **TOL, err_msg=clause)
    explain = dict(conn.query(f"EXPLAIN AVG NEURONS IN {name} TOKEN 0 WHERE class = 2").rows)
    assert explain["per item"].startswith("TOKEN 0: each hidden unit at the item's first real "
                                          "token; real tokens (the attention_mask of the batch")
    # The data's first item is the longest, which every probe of the first items pads to; the
    # last item alone tells the length changes, so the statement is refused before any pass.
    with pytest.raises(BindError, match="TOKENS ALL needs one sequence length"):
        conn.query(f"AVG NEURONS IN {name} TOKENS ALL")


def test_bert_describe_catalog_and_refusals(bert_world):
    model, conn, sequences, per_item, y = bert_world
    rows = dict(conn.query("DESCRIBE bert.encoder.layer.0").rows)
    assert rows["axes"].startswith("batch: axis 0 of 3 (the only axis that follows the batch")
    assert "sequence: axis 1" in rows["axes"] and "hidden: axis 2 (16 units)" in rows["axes"]
    assert rows["real tokens"] == "the attention_mask of the batch input"
    assert rows["neurons"].startswith("16 hidden units")
    assert "TOKEN n" in rows["tokens"]
    with pytest.raises(BindError, match="'bert.embeddings.position_embeddings' cannot be queried: "
                                        "no axis of its output follows the batch"):
        conn.query("AVG NEURONS IN bert.embeddings.position_embeddings")
    catalog = conn.catalog
    assert LayerCatalog.from_arrays(catalog.to_arrays()).layers == catalog.layers


def test_bert_latent_and_evaluate_use_the_same_per_item_vectors(bert_world):
    model, conn, sequences, per_item, y = bert_world
    name = "bert.encoder.layer.1"
    rows = bert_rows(per_item, name)
    groups = cell_codes(conn.profile.labels, conn.profile.correct)
    count = n_cells(conn.profile.n_classes)
    position = np.full(len(y), -1)
    answers = forward_pass(conn, [conn.catalog[name]], groups, count, position, 0)[name]
    for code in np.unique(groups).tolist():
        np.testing.assert_allclose(answers.sums[code], rows[groups == code].sum(axis=0), **TOL)
    conn.query(f"SET latent = {name}")
    try:
        np.testing.assert_allclose(conn.profile.latents, rows, **TOL)
    finally:
        conn.query("SET latent = default")


def test_bert_fixed_length_tokens_all_counts_every_position(bert_world):
    model, _, sequences, _, y = bert_world
    conn = diagql.connect(model, tm.DictDataset(sequences, torch.from_numpy(y), length=12),
                          cache_dir=False, progress=False)
    padded = tm.pad(sequences, 12)
    out = capture(model, ["bert.encoder.layer.1"], **padded)["bert.encoder.layer.1"]
    every = conn.query("AVG NEURONS IN bert.encoder.layer.1 TOKENS ALL")
    np.testing.assert_allclose(every.values, out.reshape(len(y), -1).double().mean(dim=0).numpy(),
                               **TOL)
    assert every.labels[17] == "bert.encoder.layer.1[1,1]"
    real = padded["attention_mask"].sum(dim=1)
    mean = conn.query("AVG NEURONS IN bert.encoder.layer.1")  # the mask leaves padding out
    np.testing.assert_allclose(mean.values, item_rows(out, real).mean(axis=0), **TOL)


@pytest.mark.parametrize("sampler", ["random(0.5)", "stratified(0.5)", "latentgrid(0.5)",
                                     "vas(0.5)", "ebtree", "weighted(0.5)", "gmm(0.5)",
                                     "maxmargin(0.5)"])
def test_bert_every_sampler_answers_from_the_sampled_items_vectors(bert_world, sampler):
    model, conn, sequences, per_item, y = bert_world
    rows = bert_rows(per_item, "bert.encoder.layer.0")
    result = conn.query(f"AVG NEURONS IN bert.encoder.layer.0 USING SAMPLE {sampler}")
    sample = conn.sample(sampler)
    assert result.n_items == len(sample) > 0
    np.testing.assert_allclose(result.values, rows[sample].mean(axis=0), **TOL)


def test_a_shared_pass_feeds_each_reduction_of_one_layer_its_own_rows(bert_world):
    model, conn, sequences, per_item, y = bert_world
    name, spec = "bert.encoder.layer.1", "random(0.4, random_state=11)"
    results = conn.execute(f"AVG NEURONS IN {name} TOKENS MAX USING SAMPLE {spec}; "
                           f"AVG NEURONS IN {name} TOKEN -1 USING SAMPLE {spec}; "
                           f"TOPK 3 NEURONS IN {name} TOKEN 0 WHERE class = 0;")
    sample = conn.sample(spec)
    np.testing.assert_allclose(results[0].values,
                               bert_rows(per_item, name, "max")[sample].mean(axis=0), **TOL)
    np.testing.assert_allclose(results[1].values,
                               bert_rows(per_item, name, "token", -1)[sample].mean(axis=0), **TOL)
    first = bert_rows(per_item, name, "token", 0)[y == 0].mean(axis=0)
    assert results[2].neurons.tolist() == top(first, 3)


class Ragged(Dataset):
    """Items ((x of its own length, no padding mask yet), y), padded per batch by ``pad``."""

    def __init__(self, sequences, labels):
        self.sequences, self.labels = sequences, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.sequences[i], self.labels[i]

    @staticmethod
    def pad(items):
        length = max(len(x) for x, _ in items)
        x = torch.zeros(len(items), length, 4)
        padding = torch.ones(len(items), length, dtype=torch.bool)
        for i, (sequence, _) in enumerate(items):
            x[i, :len(sequence)] = sequence
            padding[i, :len(sequence)] = False
        return (x, padding), torch.stack([torch.as_tensor(label) for _, label in items])


def test_batch_first_breaks_a_tie_the_probes_cannot():
    # Items 0, 1, 2 have 1, 2 and 3 tokens: a time-first output of the probes is (1, 1, D),
    # (2, 2, D), (3, 3, D), where both leading axes follow the batch.
    g = torch.Generator().manual_seed(8)
    lengths = [1, 2, 3] + torch.randint(1, S + 1, (27,), generator=g).tolist()
    sequences = [torch.randn(n, 4, generator=g) for n in lengths]
    y = torch.randint(0, C, (len(lengths),), generator=g)
    torch.manual_seed(2)
    model = Encoder(batch_first=False, use_mask=True).eval()
    data = DataLoader(Ragged(sequences, y), batch_size=4, collate_fn=Ragged.pad)
    conn = diagql.connect(model, data, batch_size=4, cache_dir=False, progress=False)
    layer = conn.catalog["enc"]
    assert layer.batch_axis == 1 and layer.varies
    # Told by the probe's items reversed (model/row_order.py), which batch_first agrees with.
    assert layer.found.startswith("the only one of axes [0, 1], each as long as the batch in "
                                  "probes of 1, 2, 3 items, that reverses with the batch's "
                                  "items; the module's batch_first agrees")
    rows = np.stack([capture(model, ["enc"], x[None], torch.zeros(1, len(x), dtype=torch.bool))
                     ["enc"][:, 0].double().mean(dim=0).numpy() for x in sequences])
    np.testing.assert_allclose(conn.query("AVG NEURONS IN enc").values, rows.mean(axis=0), **TOL)


class _TokenHead(nn.Module):
    """A head that reads one token of its encoder: the first ([CLS], a ViT's) or the last (an
    RNN's, a GPT's)."""

    def __init__(self, position: int):
        super().__init__()
        self.position = position
        self.embed = nn.Embedding(12, 8)
        self.rnn = nn.GRU(8, 8, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(self.norm(self.rnn(self.embed(ids))[0])[:, self.position])


@pytest.mark.parametrize("position", [0, -1])
def test_a_token_the_head_reads_is_answered_from_the_profiles_latent(position):
    torch.manual_seed(8)
    ids, y = torch.randint(0, 12, (120, 5)), torch.randint(0, 3, (120,))
    model = _TokenHead(position).eval()
    conn = diagql.connect(model, (ids, y), cache_dir=False, progress=False)
    query = f"AVG NEURONS IN norm TOKEN {position} WHERE class = 1 USING SAMPLE random(0.3)"
    assert "none: the rows of norm are the profile's latent" in str(conn.query("EXPLAIN " + query))
    result = conn.query(query)
    with torch.no_grad():
        rows = model.norm(model.rnn(model.embed(ids))[0])[:, position].double()
    sampled = conn.sample("random(0.3)")
    sampled = sampled[(y[sampled] == 1).numpy()]
    # The sampled items' rows, as the profile holds them: the estimate predicts each matching
    # item from its own row, so the answer is every matching item's mean.
    np.testing.assert_allclose(result.values, rows[y == 1].mean(0).numpy(), atol=1e-5)
    assert len(sampled) == result.estimate.n
    # Another token of the same layer is not the latent (its rows are rebuilt from its own
    # directions, which span the 8 units: not the latent's).
    other = 1 if position == 0 else 0
    assert "the profile's latent" not in str(conn.query(
        f"EXPLAIN AVG NEURONS IN norm TOKEN {other} USING SAMPLE random(0.3)"))


class _PositionalMask(nn.Module):
    """forward(input_ids, attention_mask): the mask given positionally, as a tuple item
    ((ids, mask), label) spreads it."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6, padding_idx=0)
        self.head = nn.Linear(6, 2)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        pooled = (h * attention_mask[..., None]).sum(1) / attention_mask.sum(1, keepdim=True)
        return self.head(pooled)


def test_an_attention_mask_given_positionally_leaves_padding_out():
    torch.manual_seed(10)
    n, length = 80, 7
    lengths = torch.randint(2, length + 1, (n,))
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 10, (n, length)) * mask
    y = torch.randint(0, 2, (n,))
    model = _PositionalMask().eval()
    conn = diagql.connect(model, list(zip(zip(ids, mask), y)), cache_dir=False, progress=False)
    with torch.no_grad():
        rows = model.embed(ids).double()
    last = rows[torch.arange(n), lengths - 1]
    mean = (rows * mask[..., None]).sum(1) / lengths[:, None]
    np.testing.assert_allclose(conn.query("AVG NEURONS IN embed TOKEN -1 USING FULL").values,
                               last.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(conn.query("AVG NEURONS IN embed USING FULL").values,
                               mean.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    assert "attention_mask" in str(conn.query("DESCRIBE embed"))


def test_describe_says_which_part_of_a_tuple_output_is_read():
    class Attends(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0].mean(1))

    torch.manual_seed(12)
    conn = diagql.connect(Attends(), (torch.randn(20, 5, 8), torch.randint(0, 3, (20,))),
                          cache_dir=False, progress=False)
    described = dict(conn.query("DESCRIBE attn").rows)["axes"]
    assert "it returns a tuple holding a tensor of shape (3, 5, 8) at position 0: that tensor " \
           "is read, the rest of the tuple is not queried" in described
    assert "it returns" not in dict(conn.query("DESCRIBE head").rows)["axes"]


def test_describe_names_the_key_of_a_dict_output_it_reads():
    """A dict of {'attn': weights, 'hidden': h} had been described as reading one tensor, "the
    rest (attention weights, hidden states) not queried", though the weights were what it read."""
    class Attention(nn.Module):
        def forward(self, x):
            weights = torch.softmax(x @ x.transpose(1, 2), dim=-1)
            return {"attn": weights, "hidden": weights @ x}

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.att, self.head = Attention(), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.att(x)["hidden"].mean(1))

    torch.manual_seed(12)
    conn = diagql.connect(Model(), (torch.randn(20, 5, 4), torch.randint(0, 3, (20,))),
                          cache_dir=False, progress=False)
    described = dict(conn.query("DESCRIBE att").rows)["axes"]
    assert "a dict holding a tensor of shape (3, 5, 5) at key 'attn': that tensor is read, the " \
           "rest of the dict is not queried" in described


@pytest.mark.parametrize("own", [True, False], ids=["own-auxiliary", "past-the-budget"])
def test_a_token_view_is_checked_on_its_own_modules_mean_view_with_the_whole_excess(
        own, monkeypatch):
    """TOKEN -1 of a GRU whose head reads it through a Linear: the profile keeps its own
    auxiliary, as a sequence block's other token views (model/auxiliaries.py). Past their
    budget, it is fitted on the GRU's mean view's leading projections (its own module's
    other view) and checked on them with each part's whole excess (half had left vas, gmm
    and maxmargin covering 0.77-0.84)."""
    import json

    from diagql.engine import covariates, extrapolation
    from diagql.model import auxiliaries

    if not own:
        monkeypatch.setattr(auxiliaries, "EXTRA_BUDGET", 0)

    class Last(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.rnn = nn.Embedding(12, 8), nn.GRU(8, 16, batch_first=True)
            self.fc, self.head = nn.Linear(16, 8), nn.Linear(8, 3)

        def forward(self, ids):
            return self.head(self.fc(self.rnn(self.embed(ids))[0][:, -1]).relu())

    torch.manual_seed(13)
    conn = diagql.connect(Last(), (torch.randint(0, 12, (200, 6)), torch.randint(0, 3, (200,))),
                          cache_dir=False, progress=False)
    profile = conn.profile
    chosen = covariates.for_view(profile, json.dumps(["rnn", "TOKEN -1"]))
    names = [key for key, _ in profile.auxiliaries.names]
    views = [json.dumps(["rnn", view]) for view in ("TOKEN -1", "TOKENS MAX", "TOKEN 0")]
    if own:
        assert set(views) <= set(names)
        assert chosen.auxiliary.key == views[0] and chosen.neighbour is None
        return
    assert not set(views) & set(names)
    assert chosen.neighbour is not None and chosen.neighbour.layer == "rnn"
    check = extrapolation.check_for(profile, "rnn", chosen)
    assert check.share == (extrapolation.WHOLE_SHARE,) * len(check.columns)
    inner = covariates.for_view(profile, json.dumps(["fc"]))
    assert inner.auxiliary is not None  # fc is a block of its own: its own minor directions


class _Pooled(nn.Module):
    """An embedding, a GRU of 16 units, its mean over the tokens read by the head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(14)
        self.embed, self.rnn = nn.Embedding(12, 8), nn.GRU(8, 16, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, ids):
        return self.head(self.rnn(self.embed(ids))[0].mean(1))


@pytest.mark.parametrize("view,reduce", [("TOKENS MAX", lambda h: h.max(1).values),
                                         ("TOKEN -1", lambda h: h[:, -1]),
                                         ("TOKEN 0", lambda h: h[:, 0])])
def test_a_sample_of_a_sequence_blocks_other_token_views_is_predicted_by_their_own_rows(
        view, reduce):
    """The head reads the GRU's mean, which the latent holds; its max, last and first token
    are no linear function of it, and a maxmargin sample's answer fitted on it had covered
    the exact means 0.17-0.33 (TOKENS MAX). Their own auxiliaries hold a 16-unit GRU's rows
    whole: the answer is the exact mean."""
    X = torch.randint(0, 12, (600, 7), generator=torch.Generator().manual_seed(14))
    y = torch.randint(0, 3, (600,), generator=torch.Generator().manual_seed(15))
    model = _Pooled().eval()
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    with torch.no_grad():
        truth = reduce(model.rnn(model.embed(X))[0]).double().numpy()
    for sampler in ("maxmargin(0.05)", "vas(0.05)"):
        answer = conn.query(f"AVG NEURONS IN rnn {view} WHERE class = 1 USING SAMPLE {sampler}")
        np.testing.assert_allclose(answer.values, truth[y.numpy() == 1].mean(axis=0),
                                   rtol=1e-4, atol=1e-5)
    # Nothing left to fit: no check widens it (its rounding had read as a miss, 1.3-1.5x).
    for where, sampler in (("class = 0 AND incorrect", "weighted(0.1)"),
                           ("class = 0 AND incorrect", "vas(0.05)"), ("incorrect", "gmm(0.1)")):
        answer = conn.query(f"AVG NEURONS IN rnn {view} WHERE {where} USING SAMPLE {sampler}")
        assert answer.estimate.widened is None


class _TokenBlock(nn.Module):
    """An embedding, then a per-token MLP block (a sequence block with layers inside), its
    mean over the tokens read by the head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(16)
        self.embed = nn.Embedding(12, 8)
        self.block = nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(self.block(self.embed(ids)).mean(1))


def test_a_layer_inside_a_sequence_block_is_fitted_on_the_blocks_view_of_its_reduction():
    """A layer inside a sequence block whose other token views the profile keeps is fitted
    on (and checked against) the block's view of its own reduction: ``block.1 TOKENS MAX``
    on ``block TOKENS MAX``. It had taken the block's first view kept, whichever that was
    (a transformer layer's TOKENS MAX under vas(0.05) covered 0.10-0.14, under maxmargin
    0.45-0.50, fitted on its encoder's TOKEN -1: benchmarks/README.md, "twenty-third
    session"). A reduction the block keeps no view of takes its first, the default."""
    import json

    from diagql.engine import covariates

    X = torch.randint(0, 12, (300, 6), generator=torch.Generator().manual_seed(16))
    conn = diagql.connect(_TokenBlock().eval(), (X, torch.randint(0, 3, (300,))),
                          cache_dir=False, progress=False)
    profile = conn.profile
    kept = [key for key, name in profile.auxiliaries.names if name == "block"]
    assert len(kept) == 4
    for view in ("TOKENS MEAN", "TOKEN -1", "TOKENS MAX", "TOKEN 0"):
        chosen = covariates.for_view(profile, json.dumps(["block.1", view]),
                                     before=("embed", "block", "block.0"))
        assert chosen.neighbour.key == json.dumps(["block", view]) and chosen.encloses
    chosen = covariates.for_view(profile, json.dumps(["block.1", "TOKEN 2"]),
                                 before=("embed", "block", "block.0"))
    assert chosen.neighbour.key == kept[0]


def test_the_other_token_views_auxiliaries_fit_their_budget_from_the_last_block_back():
    from diagql.model import auxiliaries

    conn = diagql.connect(_Pooled(), (torch.randint(0, 12, (40, 7)), torch.randint(0, 3, (40,))),
                          cache_dir=False, progress=False)
    layers = [conn.catalog[name] for name in ("embed", "rnn", "head")]
    per_view = auxiliaries.DIMS * 4
    n = auxiliaries.EXTRA_BUDGET // (3 * per_view)  # room for three
    keys = [view.key for view in auxiliaries._views(layers, n)]
    assert keys == ['["embed", "TOKENS MEAN"]', '["embed", "TOKEN -1"]',
                    '["rnn", "TOKENS MEAN"]', '["rnn", "TOKEN -1"]', '["rnn", "TOKENS MAX"]',
                    '["head"]']
    assert len(auxiliaries._views(layers, 10 ** 9)) == 3  # one each past the budget


class _AbsolutePositions(nn.Module):
    """A GPT-2's positions: counted from the batch's first column, so that left padding moves
    an item's tokens to other positions (other outputs) in a batch with a longer item."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.embed, self.position = nn.Embedding(20, 8), nn.Embedding(16, 8)
        self.head = nn.Linear(8, C)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids) + self.position(torch.arange(input_ids.shape[1]))
        h = (h * attention_mask[..., None]).sum(1) / attention_mask.sum(1, keepdim=True)
        return self.head(h)


def _left_padded(batch):
    longest = max(len(ids) for ids, _ in batch)
    ids = torch.zeros(len(batch), longest, dtype=torch.long)
    mask = torch.zeros(len(batch), longest, dtype=torch.long)
    for row, (tokens, _) in enumerate(batch):
        ids[row, longest - len(tokens):], mask[row, longest - len(tokens):] = tokens, 1
    return {"input_ids": ids, "attention_mask": mask}, torch.tensor([y for _, y in batch])


def test_left_padding_that_changes_outputs_is_warned_of_when_the_first_item_is_longest():
    """Only the first item was compared alone and in a batch: the batch's longest, it is
    padded in neither, and the others' answers depend on their batch without a word."""
    g = torch.Generator().manual_seed(6)
    lengths = [8, 3, 5] + torch.randint(2, 9, (27,), generator=g).tolist()
    items = [(torch.randint(1, 20, (n,), generator=g), i % C) for i, n in enumerate(lengths)]
    loader = DataLoader(items, batch_size=8, collate_fn=_left_padded)
    with pytest.warns(diagql.DiagQLWarning, match="padding to the batch's longest item"):
        conn = diagql.connect(_AbsolutePositions(), loader, cache_dir=False, progress=False)
        conn.query("AVG NEURONS IN head")


def test_a_length_the_probes_first_items_did_not_show_is_named_as_padding_per_batch():
    """The first items padded to one length, so the probe's batches saw a fixed shape; a
    later batch's other length was refused as "expected (3, 6) as in the catalog probe".
    The data's last item alone shows the length changes: refused before any pass, and if a
    length neither shows comes in a pass, named there."""
    lengths = [6, 6, 6] + [9] * 9
    items = [(torch.randint(1, 20, (n,)), i % 2) for i, n in enumerate(lengths)]

    def pad(batch):
        ids = nn.utils.rnn.pad_sequence([x for x, _ in batch], batch_first=True)
        return ids, torch.tensor([y for _, y in batch])

    model = _TextConv()
    conn = diagql.connect(model, DataLoader(items, batch_size=4, collate_fn=pad),
                          cache_dir=False, progress=False)
    with pytest.raises(BindError, match="the output shape of layer 'conv' changes with the "
                                        "batch, so its neurons are not fixed"):
        conn.query("AVG NEURONS IN conv")
    items[-1] = (items[-1][0][:6], 1)  # the last item as long as the first: the pass tells
    conn = diagql.connect(model, DataLoader(items, batch_size=4, collate_fn=pad),
                          cache_dir=False, progress=False)
    with pytest.raises(ExecutionError, match=r"shape \(3, 9\) in a batch of 4 items, where the "
                                             r"probe's batches of the data's first items gave "
                                             r"\(3, 6\): its shape changes with the batch"):
        conn.query("AVG NEURONS IN conv")


@pytest.mark.parametrize("padding", [0.0, float("nan"), float("inf")])
def test_a_tokens_mean_leaves_out_padding_whatever_it_holds(padding):
    """The mean over real tokens, taken as the mask's product with the values (no copy of a
    wide output), against float64 sums of the real tokens; padding that holds NaN or inf (a
    fully masked attention row) takes the masked sum instead, and counts for nothing."""
    from diagql.model.views import _mean

    g = torch.Generator().manual_seed(7)
    values = torch.randn(9, 6, 5, generator=g)
    real = torch.rand(9, 6, generator=g) > 0.4
    real[:, 0] = True
    values[~real] = padding
    got = _mean(values, real, "layer 'x'")
    want = [values[i][real[i]].double().mean(dim=0) for i in range(9)]
    np.testing.assert_allclose(got.numpy(), torch.stack(want).numpy(), rtol=1e-6, atol=1e-7)
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())


class _Frames(nn.Module):
    """An audio encoder: samples to frames by a strided conv, then a projection of the frames;
    its attention_mask marks samples, not frames."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.proj, self.head = nn.Conv1d(1, 4, 4, stride=4), nn.Linear(4, 5), \
            nn.Linear(5, 2)

    def forward(self, input_values, attention_mask):
        frames = self.conv(input_values[:, None]).transpose(1, 2)
        return self.head(self.proj(frames).mean(1))


def test_a_mask_of_another_length_than_the_layers_is_said_to_mark_none_of_it():
    """A Wav2Vec2's sample-level mask beside its frames was dropped without a word: the
    padded frames counted in TOKENS MEAN (0.36-0.78 off)."""
    g = torch.Generator().manual_seed(0)
    data = {"input_values": torch.randn(30, 64, generator=g),
            "attention_mask": torch.ones(30, 64, dtype=torch.long),
            "labels": torch.arange(30) % 2}
    db = diagql.connect(_Frames().eval(), data, cache_dir=False, progress=False)
    assert dict(db.query("DESCRIBE proj").rows)["real tokens"] == (
        "every position: the batch input's attention_mask marks 64 positions, where this "
        "layer has 16, so it marks none of them")
    with pytest.warns(diagql.DiagQLWarning, match="layer 'proj': the batch input's "
                                                  "attention_mask marks 64 positions.*padding "
                                                  "counts as tokens"):
        db.query("AVG NEURONS IN proj")


class _FramesNorm(torch.nn.Module):
    """A Whisper-style encoder's front: a conv over time, its frames transposed to tokens, a
    LayerNorm of each frame's features, as many frames as features (8 × 8); beside it a
    LayerNorm of a conv map's length, after an activation and a product (sweep SX9: read as
    tokens by a first fix)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv1d(3, 8, 3, padding=1)
        self.norm = torch.nn.LayerNorm(8)
        self.other = torch.nn.Conv1d(3, 6, 3, padding=1)
        self.lengthwise = torch.nn.LayerNorm(8)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        h = self.conv(x)
        frames = torch.nn.functional.gelu(h).transpose(1, 2) + 0.5  # Whisper's, positions
        lengthwise = self.lengthwise(torch.relu(self.other(x)) * 2)  # (6 channels, 8 long)
        return self.head(self.norm(frames).mean(1) + lengthwise.mean(1)[:, :1])


def test_a_layernorm_of_frames_is_a_sequence_even_shaped_as_the_conv_before_it():
    """Sweep SX6: the LayerNorm took the conv's channels-first layout (its shape the same, 8
    × 8), AVG CHANNELS answering each frame's mean over its normalised features, all 0."""
    model = _FramesNorm().eval()
    X, y = torch.randn(40, 3, 8), torch.randint(0, 2, (40,))
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    with torch.no_grad():
        h = model.conv(X)
        frames = model.norm(torch.nn.functional.gelu(h).transpose(1, 2) + 0.5)
        lengthwise = model.lengthwise(torch.relu(model.other(X)) * 2)
    np.testing.assert_allclose(db.query("AVG NEURONS IN norm").values,
                               frames.double().mean((0, 1)).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(db.query("AVG NEURONS IN norm TOKEN 0").values,
                               frames[:, 0].double().mean(0).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(db.query("AVG CHANNELS IN lengthwise").values,
                               lengthwise.double().mean((0, 2)).numpy(), rtol=1e-5, atol=1e-6)
