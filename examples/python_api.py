"""DiagQL from Python: connect any model to labelled data and query it.

Run: python examples/python_api.py   (needs: pip install "diagql[demo]")
"""
import numpy as np
import torch
from torch import nn

import diagql

# 1. The built-in demo: LeNet-5 over 2,500 held-out MNIST digits.
db = diagql.demo()
result = db.query("TOPK 5 NEURONS IN conv2 WHERE class = 3 AND incorrect "
                  "USING SAMPLE stratified(0.1) WITH BASELINE")
print(result)                      # a rich table
print(result.labels)               # ['conv2[...]', ...] in rank order
print(result.metrics["precision"])  # agreement with the exact top-5

# Arrays for further work: flat C-order neuron indices and their values.
avg = db.query("AVG NEURONS IN fc1 WHERE incorrect")
print(avg.neurons.shape, avg.values.shape, avg.n_items)

# A sample is just sorted item indices.
print(db.sample("stratified(0.05)")[:10])

# 2. Any model and any labelled data: here a small MLP on random data.
torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(inplace=True), nn.Linear(16, 3))
X, y = torch.randn(300, 20), torch.randint(0, 3, (300,))
mine = diagql.connect(model, (X, y), batch_size=64)
print(mine.layers)                 # ['0', '1', '2', '3']: bare indices of nn.Sequential
top, by_correctness = mine.execute("TOPK 3 NEURONS IN 1 WHERE class = 2; "
                                   "ARGMAX NEURONS IN 1 GROUP BY correct")
print(top.labels, np.round(top.values, 3))
for correct, part in by_correctness.groups.items():   # one Result per group value
    print("correct" if correct else "incorrect", part.n_items, part.labels[np.argmax(part.values)])

# 3. Mistakes are DiagQLErrors that point at the problem.
try:
    db.query("TOPK 5 NEURONS IN conv3")
except diagql.DiagQLError as err:
    print(err.format())
