"""Sentiment classification on IMDB with a bidirectional LSTM."""
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

import flor_ray as flor
from imdb import make_iterators

EMBED = 128
HIDDEN = 256
epochs = flor.arg("epochs", 8)
lr = flor.arg("lr", 1e-3)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class SentimentLSTM(nn.Module):
    def __init__(self, vocab_size, embed=EMBED, hidden=HIDDEN, layers=2):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed, padding_idx=0)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True, bidirectional=True, dropout=0.3)
        self.fc = nn.Linear(2 * hidden, 1)

    def forward(self, text, lengths):
        emb = self.embedding(text)
        packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (hidden, _) = self.lstm(packed)
        hidden = torch.cat([hidden[-2], hidden[-1]], dim=1)
        return self.fc(hidden).squeeze(1)


def binary_accuracy(preds, y):
    return ((torch.sigmoid(preds) > 0.5).float() == y).float().mean()


def evaluate(model, iterator, criterion):
    model.eval()
    epoch_loss = epoch_acc = 0.0
    with torch.no_grad():
        for text, lengths, labels in iterator:
            preds = model(text.to(device), lengths)
            epoch_loss += criterion(preds, labels.to(device)).item()
            epoch_acc += binary_accuracy(preds, labels.to(device)).item()
    return epoch_loss / len(iterator), epoch_acc / len(iterator)


train_iter, valid_iter, vocab = make_iterators(batch_size=64)
model = SentimentLSTM(len(vocab)).to(device)
optimizer = torch.optim.Adam(model.parameters(), lr=lr)
criterion = nn.BCEWithLogitsLoss()
patience, bad_epochs, best_valid = 3, 0, float("inf")

with flor.checkpointing(model=model, optimizer=optimizer):
    for epoch in flor.loop("epoch", range(epochs)):
        model.train()
        epoch_loss = 0.0
        for text, lengths, labels in flor.loop("step", train_iter):
            text, labels = text.to(device), labels.to(device)
            optimizer.zero_grad()
            preds = model(text, lengths)
            loss = criterion(preds, labels)
            acc = binary_accuracy(preds, labels)
            loss.backward()
            optimizer.step()
            epoch_loss += loss.item()
        valid_loss, valid_acc = evaluate(model, valid_iter, criterion)
        flor.log("valid_loss", valid_loss)
        if valid_loss < best_valid:
            best_valid = valid_loss
            bad_epochs = 0
            torch.save(model.state_dict(), "best-lstm.pt")
        else:
            bad_epochs += 1
        if bad_epochs >= patience:
            print("early stopping at epoch", epoch)
            break
        elif bad_epochs > 0:
            print("no improvement for", bad_epochs, "epochs")

print("best validation loss", best_valid)
