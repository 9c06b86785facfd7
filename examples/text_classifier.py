"""DiagQL on a Hugging Face text classifier: where and why does it get sentences wrong?

Run: python examples/text_classifier.py   (needs: pip install transformers)

No pretrained encoder can be downloaded here, so the script trains a tiny BERT (from a
config, random init, a few seconds on CPU) on a toy sentiment language: a sentence is
negative, positive or neutral by its one sentiment word, and "not" flips the word after it.
Negation is where such a model errs, and the questions below find that out from the model
alone. With a real model, replace `train_tiny_bert()` by `from_pretrained(...)` and the
sentences by your tokenizer's output: the data forms and the queries stay the same.
"""
import random

import torch
from torch.utils.data import DataLoader, Dataset

import diagql

POSITIVE = ["good", "great", "fine", "love", "nice"]
NEGATIVE = ["bad", "awful", "poor", "hate", "sad"]
FILLER = ["the", "movie", "was", "it", "a", "plot", "and", "really", "very", "show", "cast"]
VOCAB = ["[PAD]", "[CLS]", "not"] + POSITIVE + NEGATIVE + FILLER
ID = {word: i for i, word in enumerate(VOCAB)}
CLASSES = ["negative", "positive", "neutral"]


def sentence(rng: random.Random) -> tuple[list[str], int]:
    """A sentence and its label: filler words around at most one sentiment word, which a
    "not" right before it flips; neutral without one."""
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 9))]
    if rng.random() < 0.25:
        return words, 2
    word = rng.choice(POSITIVE if rng.random() < 0.5 else NEGATIVE)
    negated = rng.random() < 0.3
    at = rng.randint(0, len(words))
    words[at:at] = ["not", word] if negated else [word]
    return words, int((word in POSITIVE) != negated)


class Sentences(Dataset):
    """Items as a tokenizer hands them: {"input_ids", "attention_mask", "labels"}, unpadded."""

    def __init__(self, n: int, seed: int):
        rng = random.Random(seed)
        self.items = [sentence(rng) for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        words, label = self.items[i]
        ids = torch.tensor([ID["[CLS]"]] + [ID[w] for w in words])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "labels": torch.tensor(label)}


def pad_batch(items):
    """Dynamic padding to the batch's longest sentence, as DataCollatorWithPadding does."""
    length = max(len(item["input_ids"]) for item in items)
    batch = {key: torch.zeros(len(items), length, dtype=torch.int64)
             for key in ("input_ids", "attention_mask")}
    for row, item in enumerate(items):
        for key in batch:
            batch[key][row, :len(item[key])] = item[key]
    batch["labels"] = torch.stack([item["labels"] for item in items])
    return batch


def train_tiny_bert(data: Dataset, steps: int = 200):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, num_labels=len(CLASSES),
                        max_position_embeddings=64)
    model = BertForSequenceClassification(config)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(data, batch_size=32, shuffle=True, collate_fn=pad_batch,
                        generator=torch.Generator().manual_seed(0))
    model.train()
    step = 0
    while step < steps:
        for batch in loader:
            loss = model(**batch).loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            step += 1
            if step == steps:
                break
    return model.eval()


model = train_tiny_bert(Sentences(2000, seed=1))
held_out = Sentences(1000, seed=2)

# The DataLoader is used for its dataset and its collate_fn: DiagQL batches in index order,
# each batch padded to its own longest sentence, and passes it as model(**batch) without the
# labels key.
db = diagql.connect(model, DataLoader(held_out, collate_fn=pad_batch), batch_size=128)

# 1. How good is it, and which classes does it confuse? (rows: true class, columns: predicted)
print(db.query("SHOW PROFILE"))

# 2. A sequence layer's neuron is a hidden unit; an item's activation of it is the mean over
#    its real tokens (padding never counts). Which units of the last encoder layer fire most
#    on the mistakes, and do they also fire on the sentences it gets right?
wrong = db.query("TOPK 5 NEURONS IN bert.encoder.layer.1 WHERE incorrect")
right = db.query("AVG NEURONS IN bert.encoder.layer.1 WHERE correct")
print(wrong)
for label, value in zip(wrong.labels, wrong.values):
    unit = int(label.split("[")[1].rstrip("]"))
    print(f"{label}: {value:.3f} on mistakes, {right.values[unit]:.3f} on correct sentences")

# 3. The [CLS] token alone (what the pooler reads), on the mistakes of class 0, on a 20%
#    sample drawn near the model's decision boundaries, checked against the exact answer.
print(db.query("TOPK 5 NEURONS IN bert.encoder.layer.1 TOKEN 0 WHERE class = 0 AND incorrect "
               "USING SAMPLE maxmargin(0.2) WITH BASELINE"))

# 4. Where do the mistakes go? The distribution of predicted classes over the wrong answers.
confused = db.query("ARGMAX NEURONS IN classifier WHERE incorrect GROUP BY class")
for label, part in confused.groups.items():
    if part.n_items:
        shares = ", ".join(f"{CLASSES[i]} {share:.0%}" for i, share in enumerate(part.values))
        print(f"true {CLASSES[label]} ({part.n_items} mistakes) predicted as: {shares}")

# 5. And why: the profile says which items are wrong; the sentences say what they share.
profile = db.profile
mistakes = [i for i in range(len(held_out)) if not profile.correct[i]]
with_not = sum("not" in held_out.items[i][0] for i in mistakes)
overall = sum("not" in words for words, _ in held_out.items) / len(held_out)
print(f"{len(mistakes)} mistakes; {with_not / max(len(mistakes), 1):.0%} of them contain 'not', "
      f"against {overall:.0%} of all sentences")
