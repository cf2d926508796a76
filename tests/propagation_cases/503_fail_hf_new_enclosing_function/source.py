"""Fine-tune BERT on GLUE/SST-2 with a plain PyTorch loop (HuggingFace-style)."""
import os

import torch
from datasets import load_dataset
from torch.utils.data import DataLoader
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    get_linear_schedule_with_warmup,
)

import flor_ray as flor

MODEL_NAME = os.environ.get("MODEL_NAME", "bert-base-uncased")
num_epochs = flor.arg("num_epochs", 3)
learning_rate = flor.arg("learning_rate", 2e-5)
warmup_ratio = flor.arg("warmup_ratio", 0.1)

tokenizer = AutoTokenizer.from_pretrained(MODEL_NAME)
raw = load_dataset("glue", "sst2")


def tokenize(batch):
    return tokenizer(batch["sentence"], truncation=True, max_length=128)


tokenized = raw.map(tokenize, batched=True).remove_columns(["sentence", "idx"])
tokenized = tokenized.rename_column("label", "labels").with_format("torch")
collator = DataCollatorWithPadding(tokenizer)
train_dataloader = DataLoader(tokenized["train"], shuffle=True, batch_size=32, collate_fn=collator)
eval_dataloader = DataLoader(tokenized["validation"], batch_size=64, collate_fn=collator)

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
model = AutoModelForSequenceClassification.from_pretrained(MODEL_NAME, num_labels=2).to(device)
optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
num_training_steps = num_epochs * len(train_dataloader)
lr_scheduler = get_linear_schedule_with_warmup(
    optimizer,
    num_warmup_steps=int(warmup_ratio * num_training_steps),
    num_training_steps=num_training_steps,
)

def report_eval(acc, epoch):
    flor.log("eval_acc_at", acc)
    print(f"epoch {epoch}: {acc:.4f}")
with flor.checkpointing(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler):
    for epoch in flor.loop("epoch", range(num_epochs)):
        model.train()
        for step, batch in enumerate(flor.loop("step", train_dataloader)):
            batch = {k: v.to(device) for k, v in batch.items()}
            outputs = model(**batch)
            loss = outputs.loss
            loss.backward()
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        model.eval()
        correct = total = 0
        for batch in eval_dataloader:
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad():
                logits = model(**batch).logits
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            total += batch["labels"].numel()
        accuracy = correct / total
        flor.log("eval_accuracy", accuracy)
        report_eval(accuracy, epoch)

model.save_pretrained("sst2-bert")
tokenizer.save_pretrained("sst2-bert")
