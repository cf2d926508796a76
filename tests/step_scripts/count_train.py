"""Step-based training: an endless flor.loop over itertools.count, ended by break."""
import argparse
import itertools
import math

import torch
import torch.nn as nn

import flor_ray as flor

parser = argparse.ArgumentParser()
parser.add_argument("--max_steps", type=int, default=2000)
parser.add_argument("--eval_interval", type=int, default=250)
args = parser.parse_args()
base_lr = flor.arg("lr", 0.05)

torch.manual_seed(0)
X = torch.randn(512, 8)
Y = (X @ torch.randn(8, 1)).squeeze(1) + 0.1 * torch.randn(512)
net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
opt = torch.optim.SGD(net.parameters(), lr=base_lr, momentum=0.9)


def lr_at(step):
    return base_lr * 0.5 * (1 + math.cos(math.pi * step / args.max_steps))


def evaluate():
    with torch.no_grad():
        return nn.functional.mse_loss(net(X).squeeze(1), Y).item()


with flor.checkpointing(net=net, opt=opt):
    for step in flor.loop("step", itertools.count(0)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        idx = torch.randint(0, 512, (16,))
        loss = nn.functional.mse_loss(net(X[idx]).squeeze(1), Y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        flor.log("loss", loss.item())
        #WNORM
        if step % args.eval_interval == 0:
            flor.log("val_mse", evaluate())
            #EVAL
        if step + 1 >= args.max_steps:
            break
print(f"trained {step + 1} steps")
