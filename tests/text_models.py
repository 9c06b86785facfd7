"""Tiny text models and token data for tests: a BERT classifier trained a little on a toy task.

Built from a config (no hub download). ``import transformers`` takes seconds, so this module
imports it only inside ``tiny_bert``. The CLI loads the entry points at the bottom:

    diagql --model tests.text_models:bert --data tests.text_models:dict_data -e 'SHOW PROFILE'
"""
from __future__ import annotations

import functools

import torch
from torch.utils.data import DataLoader, Dataset

VOCAB, PAD_ID, CLS_ID = 50, 0, 1
N_LABELS = 3
_CLASS_TOKENS = 10  # token 10 + c marks class c; tokens 13.. are noise
_MIN_LEN, _MAX_LEN = 4, 12


def token_data(n: int = 60, seed: int = 0, num_labels: int = N_LABELS
               ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``n`` token sequences of 4..12 int64 ids (CLS first, no padding) and their labels.

    The label is the class whose marker token (10 + label) occurs most often; each sequence
    holds one to three markers among noise tokens, and ties go to the smallest class, so the
    task is learnable from the tokens but not trivially so.
    """
    g = torch.Generator().manual_seed(seed)
    sequences, labels = [], []
    for _ in range(n):
        length = int(torch.randint(_MIN_LEN, _MAX_LEN + 1, (), generator=g))
        body = torch.randint(_CLASS_TOKENS + num_labels, VOCAB, (length - 1,), generator=g)
        n_markers = int(torch.randint(1, 4, (), generator=g))
        places = torch.randperm(length - 1, generator=g)[:n_markers]
        body[places] = _CLASS_TOKENS + torch.randint(0, num_labels, (len(places),), generator=g)
        counts = torch.bincount(body[places] - _CLASS_TOKENS, minlength=num_labels)
        labels.append(int(counts.argmax()))
        sequences.append(torch.cat([torch.tensor([CLS_ID]), body]))
    return sequences, torch.tensor(labels, dtype=torch.int64)


def pad(sequences: list[torch.Tensor], length: int | None = None) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of shape (n, length), right-padded with PAD_ID
    (``length`` defaults to the longest sequence)."""
    length = max(len(s) for s in sequences) if length is None else length
    ids = torch.full((len(sequences), length), PAD_ID, dtype=torch.int64)
    mask = torch.zeros((len(sequences), length), dtype=torch.int64)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def pad_collate(items: list[dict]) -> dict[str, torch.Tensor]:
    """Dynamic padding, as transformers.DataCollatorWithPadding does: the batch is padded to
    its own longest sequence; every other key is stacked."""
    batch = pad([item["input_ids"] for item in items])
    for key in items[0]:
        if key not in ("input_ids", "attention_mask"):
            batch[key] = torch.stack([torch.as_tensor(item[key]) for item in items])
    return batch


class DictDataset(Dataset):
    """Items ``{"input_ids", "attention_mask", label_key}``: unpadded when ``length`` is None
    (for a padding collate), else padded to ``length``; ``label_key=None`` leaves labels out."""

    def __init__(self, sequences, labels, length: int | None = None,
                 label_key: str | None = "labels"):
        self.sequences, self.labels = sequences, labels
        self.length, self.label_key = length, label_key

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if self.length is None:
            item = {"input_ids": self.sequences[i],
                    "attention_mask": torch.ones(len(self.sequences[i]), dtype=torch.int64)}
        else:
            item = {k: v[0] for k, v in pad([self.sequences[i]], self.length).items()}
        if self.label_key is not None:
            item[self.label_key] = self.labels[i]
        return item


class PairDataset(Dataset):
    """Items ``({"input_ids", "attention_mask"}, y)``, padded to ``length``."""

    def __init__(self, sequences, labels, length: int = _MAX_LEN):
        self.inputs, self.labels = pad(sequences, length), labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return {k: v[i] for k, v in self.inputs.items()}, self.labels[i]


def tiny_bert(num_labels: int = N_LABELS, seed: int = 0):
    """A BertForSequenceClassification (hidden 16, 2 layers) trained a little on
    ``token_data(seed=seed)``, in eval mode. Each call returns a fresh model with the same
    weights (training runs once per arguments); the global RNG is left as it was."""
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(_config(BertConfig, num_labels))
    model.load_state_dict(_trained_weights(num_labels, seed))
    return model.eval()


def _config(config_class, num_labels: int):
    return config_class(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, num_labels=num_labels,
                        max_position_embeddings=32, pad_token_id=PAD_ID)


@functools.lru_cache(maxsize=4)
def _trained_weights(num_labels: int, seed: int) -> dict[str, torch.Tensor]:
    from transformers import BertConfig, BertForSequenceClassification

    threads = torch.get_num_threads()
    # One thread: the same weights on every machine, and tiny ops on a busy machine run ~50x
    # faster than with a contended thread pool.
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = BertForSequenceClassification(_config(BertConfig, num_labels))
            sequences, labels = token_data(200, seed=seed + 1000, num_labels=num_labels)
            inputs = pad(sequences)
            optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
            model.train()
            for _ in range(60):
                optimizer.zero_grad()
                model(**inputs, labels=labels).loss.backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- entry points for the CLI (--model / --data MODULE:CALLABLE) -------------------------------

def bert():
    return tiny_bert()


def dict_data() -> DictDataset:
    """A Dataset of fixed-length padded dicts with the labels under ``labels``."""
    return DictDataset(*token_data(), length=_MAX_LEN)


def sentiment_data() -> DictDataset:
    """Like dict_data, but the labels are under ``sentiment``: no conventional key names them."""
    return DictDataset(*token_data(), length=_MAX_LEN, label_key="sentiment")


def loader_data() -> DataLoader:
    """A DataLoader over unpadded dicts that pads each batch to its longest sequence."""
    return DataLoader(DictDataset(*token_data()), batch_size=8, collate_fn=pad_collate)
