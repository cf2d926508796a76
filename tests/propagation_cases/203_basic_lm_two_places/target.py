"""Train a small Transformer language model on WikiText-2."""
import argparse
import math
import time

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

import flor_ray as flor
from lm_data import build_vocab, load_split, batchify


class TransformerLM(nn.Module):
    def __init__(self, vocab, d_model=256, nhead=4, layers=4, dropout=0.1):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(1, 512, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead, 4 * d_model, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens):
        n = tokens.size(1)
        mask = nn.Transformer.generate_square_subsequent_mask(n).to(tokens.device)
        h = self.embed(tokens) + self.pos[:, :n]
        return self.head(self.encoder(h, mask=mask, is_causal=True))


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--log-every", type=int, default=100)
    return parser.parse_args()


@torch.no_grad()
def evaluate(model, data, criterion, device):
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in data:
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(inputs)
        total += criterion(logits.flatten(0, 1), targets.flatten()).item()
        count += 1
    model.train()
    return total / max(count, 1)


def main():
    args = parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = build_vocab("wikitext-2")
    train_data = batchify(load_split("train", vocab), args.batch_size, args.seq_len)
    val_data = batchify(load_split("valid", vocab), args.batch_size, args.seq_len)

    model = TransformerLM(len(vocab)).to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)

    with flor.checkpointing(model=model, optimizer=optimizer, scheduler=scheduler):
        for epoch in flor.loop("epoch", range(args.epochs)):
            start = time.time()
            total_loss = 0.0
            for step, (inputs, targets) in enumerate(flor.loop("step", train_data)):
                inputs, targets = inputs.to(device), targets.to(device)
                optimizer.zero_grad()
                logits = model(inputs)
                loss = criterion(logits.flatten(0, 1), targets.flatten())
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
                optimizer.step()
                total_loss += loss.item()
                if step % args.log_every == 0:
                    print(f"epoch {epoch} step {step} loss {loss.item():.3f}")
            scheduler.step()
            val_loss = evaluate(model, val_data, criterion, device)
            flor.log("val_loss", val_loss)
            flor.log("val_ppl", math.exp(val_loss))
            print(f"epoch {epoch} took {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
