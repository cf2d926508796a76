"""Three versions of a small torch training script, for the replay tests.

v1: `net`, train step inline; v2: renamed `model`, train step extracted into a
function; v3: a learning-rate scheduler added. `#GNORM_*` / `#WNORM_*` markers show
where today's new statements go; `with_statements` types them in by hand.
"""

HEAD = '''
import random

import torch
import torch.nn as nn

import flor_ray as flor

torch.manual_seed(0)
random.seed(0)
lr = flor.arg("lr", 0.05)
epochs = flor.arg("epochs", 4)
X = torch.randn(96, 8)
Y = (X[:, 0] - X[:, 2] > 0).long()
'''

# v1: `net`, train step inline
V1 = HEAD + '''
net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))
opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)

with flor.checkpointing(net=net, opt=opt):
    for epoch in flor.loop("epoch", range(epochs)):
        net.train()
        perm = torch.randperm(96)
        for step in flor.loop("step", range(6)):
            idx = perm[step * 16 : step * 16 + 16]
            loss = nn.functional.cross_entropy(net(X[idx]), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            #GNORM_NET
            flor.log("loss", loss.item())
        net.eval()
        with torch.no_grad():
            acc = (net(X).argmax(1) == Y).float().mean().item()
        flor.log("acc", acc)
        #WNORM_NET
'''

# v2: renamed to `model`; the train step extracted into a function
V2 = HEAD + '''
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))
opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def train_step(idx):
    loss = nn.functional.cross_entropy(model(X[idx]), Y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    #GNORM_MODEL
    return loss


with flor.checkpointing(model=model, opt=opt):
    for epoch in flor.loop("epoch", range(epochs)):
        model.train()
        perm = torch.randperm(96)
        for step in flor.loop("step", range(6)):
            loss = train_step(perm[step * 16 : step * 16 + 16])
            flor.log("loss", loss.item())
        model.eval()
        with torch.no_grad():
            acc = (model(X).argmax(1) == Y).float().mean().item()
        flor.log("acc", acc)
        #WNORM_MODEL
'''

# v3 = today's shape: a learning-rate scheduler added
V3 = V2.replace(
    "opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)\n",
    "opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)\n"
    "scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)\n",
).replace("with flor.checkpointing(model=model, opt=opt):", "with flor.checkpointing(model=model, opt=opt, scheduler=scheduler):").replace(
    '        flor.log("acc", acc)\n        #WNORM_MODEL\n',
    '        flor.log("acc", acc)\n        scheduler.step()\n        #WNORM_MODEL\n',
)

GNORM = 'flor.log("gnorm", sum(p.grad.norm() ** 2 for p in {m}.parameters()).item())'
WNORM = 'flor.log("wnorm", {m}[0].weight.norm().item())'


def with_statements(src: str) -> str:
    """The version with both statements typed in by hand."""
    for m in ("net", "model"):
        src = src.replace(f"#GNORM_{m.upper()}", GNORM.format(m=m)).replace(f"#WNORM_{m.upper()}", WNORM.format(m=m))
    return src


def plain(src: str) -> str:
    return "\n".join(ln for ln in src.splitlines() if not ln.strip().startswith("#")) + "\n"
