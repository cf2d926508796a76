"""A Lightning-style module trained by a small hand-written loop."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import flor_ray as flor
from mnist_data import mnist_loaders


class LitClassifier(nn.Module):
    def __init__(self, hidden=256, lr=1e-3):
        super().__init__()
        self.model = nn.Sequential(
            nn.Flatten(),
            nn.Linear(28 * 28, hidden),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(hidden, 10),
        )
        self.lr = lr
        self.l2_penalty = 1e-4
        self.val_outputs = []

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        flor.log("reg", self.l2_penalty * sum(p.pow(2).sum() for p in self.parameters()).item())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.val_outputs.append((loss.item(), (logits.argmax(1) == y).float().mean().item()))

    def on_validation_epoch_end(self):
        losses, accs = zip(*self.val_outputs)
        self.val_outputs.clear()
        val_loss = sum(losses) / len(losses)
        val_acc = sum(accs) / len(accs)
        flor.log("val_acc", val_acc)
        return val_loss

    def on_train_start(self):
        flor.log("n_params", sum(p.numel() for p in self.parameters()))
    def configure_optimizers(self):
        flor.log("configured", 1)
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
        return optimizer, scheduler


class Trainer:
    def __init__(self, max_epochs=10, device="cpu"):
        self.max_epochs = max_epochs
        self.device = device

    def fit(self, module, train_loader, val_loader):
        optimizer, scheduler = module.configure_optimizers()
        module.to(self.device)
        with flor.checkpointing(module=module, optimizer=optimizer):
            for epoch in flor.loop("epoch", range(self.max_epochs)):
                module.train()
                for batch_idx, batch in enumerate(flor.loop("step", train_loader)):
                    batch = [t.to(self.device) for t in batch]
                    optimizer.zero_grad()
                    loss = module.training_step(batch, batch_idx)
                    loss.backward()
                    optimizer.step()
                scheduler.step()
                module.eval()
                with torch.no_grad():
                    for batch_idx, batch in enumerate(val_loader):
                        module.validation_step([t.to(self.device) for t in batch], batch_idx)
                val_loss = module.on_validation_epoch_end()


if __name__ == "__main__":
    train_loader, val_loader = mnist_loaders(batch_size=128)
    trainer = Trainer(max_epochs=flor.arg("epochs", 10))
    trainer.fit(LitClassifier(lr=flor.arg("lr", 1e-3)), train_loader, val_loader)
