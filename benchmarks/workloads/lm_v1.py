"""LSTM language model workload, v1: next-token prediction on generated token sequences."""
import random

import numpy as np
import torch
import torch.nn as nn

import flor_ray as flor

torch.manual_seed(0)
random.seed(0)
np.random.seed(0)

lr = flor.arg("lr", 0.01)
epochs = flor.arg("epochs", 4)
steps = flor.arg("steps", 16)
VOCAB = 64
SEQ = 32
BATCH = 16
N = 512

# sequences from a fixed random Markov chain over VOCAB tokens: learnable structure
P = torch.softmax(3.0 * torch.randn(VOCAB, VOCAB), dim=1)
tokens = [torch.randint(0, VOCAB, (N,))]
for _ in range(SEQ):
    tokens.append(torch.multinomial(P[tokens[-1]], 1).squeeze(1))
data = torch.stack(tokens, dim=1)
held_out = data[:64]


class LSTMLM(nn.Module):
    def __init__(self, vocab=VOCAB, dim=32, hidden=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.rnn = nn.LSTM(dim, hidden, batch_first=True)
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x):
        h, _ = self.rnn(self.emb(x))
        return self.out(self.drop(h))


def nll(net, batch):
    logits = net(batch[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


lm = LSTMLM()
opt = torch.optim.Adam(lm.parameters(), lr=lr)

with flor.checkpointing(model=lm, optimizer=opt):
    for epoch in flor.loop("epoch", range(epochs)):
        lm.train()
        perm = torch.randperm(N)
        for step in flor.loop("step", range(steps)):
            idx = perm[(step * BATCH) % N : (step * BATCH) % N + BATCH]
            loss = nll(lm, data[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            flor.log("loss", loss.item())
        lm.eval()
        with torch.no_grad():
            ppl = torch.exp(nll(lm, held_out)).item()
        flor.log("val_ppl", ppl)
