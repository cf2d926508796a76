"""CNN workload, v2: `net` renamed `model`, the train step extracted; a small conv net on synthetic 3x32x32 images (generated, no downloads)."""
import random

import numpy as np
import torch
import torch.nn as nn

import flor_ray as flor

torch.manual_seed(0)
random.seed(0)
np.random.seed(0)

lr = flor.arg("lr", 0.05)
epochs = flor.arg("epochs", 4)
steps = flor.arg("steps", 16)
BATCH = 32
N = 1024

# synthetic images; labels from a fixed random projection, so the loss falls
X = torch.randn(N, 3, 32, 32)
Y = (X.flatten(1) @ torch.randn(3 * 32 * 32, 10)).argmax(1)
Xv, Yv = X[:256], Y[:256]


class ConvNet(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.c1 = nn.Conv2d(3, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 8 * 8, 64)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.c1(x)), 2)
        x = torch.max_pool2d(torch.relu(self.c2(x)), 2)
        return self.fc2(self.drop(torch.relu(self.fc1(x.flatten(1)))))


model = ConvNet()
opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def train_step(idx):
    loss = nn.functional.cross_entropy(model(X[idx]), Y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


with flor.checkpointing(model=model, optimizer=opt):
    for epoch in flor.loop("epoch", range(epochs)):
        model.train()
        perm = torch.randperm(N)
        for step in flor.loop("step", range(steps)):
            loss = train_step(perm[(step * BATCH) % N : (step * BATCH) % N + BATCH])
            flor.log("loss", loss.item())
        model.eval()
        with torch.no_grad():
            acc = (model(Xv).argmax(1) == Yv).float().mean().item()
        flor.log("val_acc", acc)
