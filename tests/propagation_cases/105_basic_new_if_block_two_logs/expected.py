"""Train a small CNN on Fashion-MNIST (hindsight-logging enabled)."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

import flor_ray as flor


class Net(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 7 * 7, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def evaluate(model, loader, device):
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            correct += (model(x).argmax(1) == y).sum().item()
            total += y.numel()
    model.train()
    return correct / total


lr = flor.arg("lr", 1e-3)
epochs = flor.arg("epochs", 10)
device = "cuda" if torch.cuda.is_available() else "cpu"
tfm = transforms.ToTensor()
train_loader = DataLoader(datasets.FashionMNIST("data", train=True, download=True, transform=tfm), batch_size=64, shuffle=True)
test_loader = DataLoader(datasets.FashionMNIST("data", train=False, download=True, transform=tfm), batch_size=512)

model = Net().to(device)
optimizer = torch.optim.Adam(model.parameters(), lr=lr)

with flor.checkpointing(model=model, optimizer=optimizer):
    for epoch in flor.loop("epoch", range(epochs)):
        total_loss = 0.0
        for x, y in flor.loop("step", train_loader):
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if torch.isnan(loss):
                raise RuntimeError("loss is NaN")
            loss.backward()
            optimizer.step()
            total_loss += loss.item()
            if loss.item() > 2.0:
                # a spike: keep the batch statistics too
                flor.log("loss_spike", loss.item())
                flor.log("spike_batch_mean", x.mean().item())
        acc = evaluate(model, test_loader, device)
        flor.log("test_acc", acc)
        print(f"epoch {epoch}: loss {total_loss:.3f} acc {acc:.3f}")
