"""A GPT-style step loop (the shape of nanoGPT's train.py) on a tiny model and data."""
import argparse
import math
import os

import torch
import torch.nn as nn
from torch.nn import functional as F

import flor_ray as flor

parser = argparse.ArgumentParser()
parser.add_argument("--out_dir", default="out")
parser.add_argument("--max_iters", type=int, default=24)
args = parser.parse_args()

out_dir = args.out_dir
max_iters = flor.arg("max_iters", args.max_iters)
eval_interval = flor.arg("eval_interval", 6)
learning_rate = flor.arg("learning_rate", 3e-3)
eval_iters = 1
gradient_accumulation_steps = 2
batch_size = 4
block_size = 8
warmup_iters = 6
lr_decay_iters = max_iters
min_lr = learning_rate / 10
grad_clip = 1.0
vocab_size = 24

torch.manual_seed(1337)
# a token stream with structure to learn: a repeating phrase, one token in eight replaced at random
phrase = torch.arange(vocab_size).repeat(60)
noise = torch.randint(0, vocab_size, phrase.shape)
data = torch.where(torch.rand(phrase.shape) < 0.125, noise, phrase)
n = int(0.9 * len(data))
train_data, val_data = data[:n], data[n:]


def get_batch(split):
    d = train_data if split == "train" else val_data
    ix = torch.randint(len(d) - block_size, (batch_size,))
    x = torch.stack([d[i : i + block_size] for i in ix])
    y = torch.stack([d[i + 1 : i + 1 + block_size] for i in ix])
    return x, y


class TinyGPT(nn.Module):
    """Token and position embeddings, one causal self-attention block, an MLP, a head."""

    def __init__(self, n_embd=16):
        super().__init__()
        self.n_embd = n_embd
        self.tok = nn.Embedding(vocab_size, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 2 * n_embd), nn.ReLU(), nn.Linear(2 * n_embd, n_embd))
        self.head = nn.Linear(n_embd, vocab_size)
        self.register_buffer("future", torch.triu(torch.ones(block_size, block_size, dtype=torch.bool), 1))

    def forward(self, idx, targets=None):
        t = idx.size(1)
        x = self.tok(idx) + self.pos(torch.arange(t))
        q, k, v = self.qkv(x).split(self.n_embd, dim=2)
        att = (q @ k.transpose(1, 2)) / math.sqrt(self.n_embd)
        att = att.masked_fill(self.future[:t, :t], float("-inf")).softmax(-1)
        x = x + att @ v
        x = x + self.mlp(x)
        logits = self.head(x)
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


model = TinyGPT()
optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.1)


@torch.no_grad()
def estimate_loss():
    out = {}
    model.eval()
    for split in ["train", "val"]:
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            X, Y = get_batch(split)
            _, loss = model(X, Y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def get_lr(it):
    # linear warmup, then cosine decay down to min_lr
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


os.makedirs(out_dir, exist_ok=True)
iter_num = 0
best_val_loss = 1e9
with flor.checkpointing(model=model, optimizer=optimizer):
    while True:
        with flor.iteration("step", iter_num):
            lr = get_lr(iter_num)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            if iter_num % eval_interval == 0:
                losses = estimate_loss()
                flor.log("val_loss", losses["val"])
                #EVAL_HINDSIGHT
                if losses["val"] < best_val_loss:
                    best_val_loss = losses["val"]
                    checkpoint = {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "iter_num": iter_num,
                        "best_val_loss": best_val_loss,
                    }
                    torch.save(checkpoint, os.path.join(out_dir, "ckpt.pt"))
            for micro_step in range(gradient_accumulation_steps):
                X, Y = get_batch("train")
                logits, loss = model(X, Y)
                loss = loss / gradient_accumulation_steps
                loss.backward()
            #GRAD_HINDSIGHT
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            flor.log("loss", loss.item() * gradient_accumulation_steps)
            flor.log("lr", lr)
        iter_num += 1
        if iter_num > max_iters:
            break
print(f"trained {iter_num} steps, best val loss {best_val_loss:.4f}")
