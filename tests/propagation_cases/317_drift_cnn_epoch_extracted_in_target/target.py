"""Train a small CNN on CIFAR-10 with hindsight logging."""
import math
import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from torch.utils.data import DataLoader

import flor_ray as flor

DATA = "./data"
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

lr = flor.arg("lr", 0.05)
momentum = flor.arg("momentum", 0.9)
batch_size = flor.arg("batch_size", 128)
epochs = flor.arg("epochs", 20)
seed = flor.arg("seed", 0)

random.seed(seed)
np.random.seed(seed)
torch.manual_seed(seed)


class ConvNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(64)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(128)
        self.dropout = nn.Dropout(0.25)
        self.fc = nn.Linear(128 * 4 * 4, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)
        x = self.dropout(torch.flatten(x, 1))
        return self.fc(x)


def get_loaders():
    norm = T.Normalize((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test_tf = T.Compose([T.ToTensor(), norm])
    train = torchvision.datasets.CIFAR10(DATA, train=True, download=True, transform=train_tf)
    test = torchvision.datasets.CIFAR10(DATA, train=False, download=True, transform=test_tf)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=2),
            DataLoader(test, batch_size=512, shuffle=False, num_workers=2))


@torch.no_grad()
def evaluate(model, loader):
    model.eval()
    correct = total = 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        correct += (model(images).argmax(1) == labels).sum().item()
        total += labels.size(0)
    model.train()
    return correct / total


def train_one_epoch(model, loader, optimizer, criterion):
    running_loss = 0.0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad()
        outputs = model(images)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()
    return running_loss / len(loader)


train_loader, test_loader = get_loaders()
model = ConvNet().to(device)
criterion = nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=5e-4)
best_acc = 0.0

with flor.checkpointing(model=model, optimizer=optimizer):
    for epoch in flor.loop("epoch", range(epochs)):
        model.train()
        train_loss = train_one_epoch(model, train_loader, optimizer, criterion)
        flor.log("train_loss", train_loss)
        test_acc = evaluate(model, test_loader)
        flor.log("test_acc", test_acc)
        best_acc = max(best_acc, test_acc)
        print(f"epoch {epoch}: loss {train_loss:.4f} acc {test_acc:.4f}")

torch.save(model.state_dict(), "convnet.pt")
print("best", best_acc)
