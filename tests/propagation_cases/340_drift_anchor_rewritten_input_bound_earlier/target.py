import math
import time

import torch
import torch.nn as nn

import flor_ray as flor


class LM(nn.Module):
    def __init__(self, vocab, dim):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x):
        out, _ = self.rnn(self.embed(x))
        return self.head(out)


def train(net, batches, criterion, optimizer):
    net.train()
    for x, y in batches:
        optimizer.zero_grad()
        loss = criterion(net(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()


def evaluate(net, batches, criterion):
    net.eval()
    total = 0.0
    with torch.no_grad():
        for x, y in batches:
            total += criterion(net(x).flatten(0, 1), y.flatten()).item()
    return total / len(batches)


def make_data(n, seed, vocab=50, seq=16):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, seq + 1), generator=g)
    return [(tokens[i:i + 8, :-1], tokens[i:i + 8, 1:]) for i in range(0, n, 8)]


model = LM(50, 32)
criterion = nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=flor.arg("lr", 1.0))
batches = {"train": make_data(256, 0), "valid": make_data(64, 1)}
prev_val = None
val_loss = float("inf")  # nothing evaluated yet
with flor.checkpointing(model=model, optimizer=optimizer):
    for epoch in flor.loop("epoch", range(1, flor.arg("epochs", 4) + 1)):
        epoch_start = time.time()
        train(model, batches["train"], criterion, optimizer)
        val_loss = evaluate(model, batches["valid"], criterion)
        print("| end of epoch %d | %.1fs | valid ppl %.2f" % (epoch, time.time() - epoch_start, math.exp(val_loss)))
        # anneal the learning rate when validation stops improving
        if prev_val is not None and val_loss > prev_val:
            for group in optimizer.param_groups:
                group["lr"] /= 4.0
        prev_val = val_loss
