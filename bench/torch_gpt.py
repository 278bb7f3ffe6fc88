"""GPT-2 in idiomatic PyTorch (nanoGPT's model), the yardstick for gptcore's training-step speed.

WHAT'S GOING ON HERE
  The same architecture as gptcore.model, written the way a PyTorch user writes it: nn.Linear layers,
  F.scaled_dot_product_attention with is_causal=True (PyTorch's fused CPU attention), tied wte/lm_head,
  torch.optim.AdamW with weight decay on the 2-D parameters only. It is only timed, never compared
  number for number (tests/test_model.py holds gptcore to PyTorch's numbers with a model written to
  share gptcore's parameter layout).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, C, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.c_attn, self.attn_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class TorchGPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.wte, self.wpe = nn.Embedding(config.vocab_size, C), nn.Embedding(config.block_size, C)
        self.blocks = nn.ModuleList(Block(C, config.n_head) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(C)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T))
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T                      # tied LM head
        return logits, F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def torch_optimizer(model, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)


def torch_training_step(model, optimizer, idx, targets):
    """One training step as the benchmarks time it: forward, backward, clipping to norm 1, AdamW."""
    def step():
        _, loss = model(idx, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step
