"""An independent, deliberately plain TC-SSA written from docs/METHOD.md, in the published
code's layout (batch size 1, one nn.Sequential per expert, a dense N x K top-2 mask, a
Python loop over experts). Tests compare ``tcssa.TCSSA`` against it."""

import torch
from torch import nn


class ReferenceExpert(nn.Module):
    def __init__(self, dim, hidden, dropout):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.LayerNorm(dim)
        )

    def forward(self, c):
        return c + self.net(c)


class ReferenceTCSSA(nn.Module):
    def __init__(self, dim, num_slots=32, hidden=512, dropout=0.25, top_k=2):
        super().__init__()
        self.gate = nn.Linear(dim, num_slots)
        self.experts = nn.ModuleList(ReferenceExpert(dim, hidden, dropout) for _ in range(num_slots))
        self.top_k = min(top_k, num_slots)

    def forward(self, x):  # x: N x D, eval mode only (no noise)
        logits = self.gate(x)
        probs = torch.softmax(logits, dim=-1)
        _, top_idx = torch.topk(probs, self.top_k, dim=-1)
        top_mask = torch.zeros_like(probs).scatter(1, top_idx, 1.0)
        truncated = probs * top_mask
        slots = truncated.t() @ x / (truncated.sum(0).unsqueeze(1) + 1e-9)
        tokens = torch.stack([expert(slots[k]) for k, expert in enumerate(self.experts)])
        # auxiliary terms, written out longhand
        num_slots = probs.shape[1]
        mean_prob = probs.mean(0)
        share = top_mask.mean(0)
        switch = num_slots * (mean_prob * share).sum()
        entropy = -(mean_prob * torch.log(mean_prob + 1e-8)).sum()
        ent_loss = 1 - entropy / torch.log(torch.tensor(float(num_slots)))
        z = 1e-4 * torch.logsumexp(logits, dim=-1).mean() ** 2
        return tokens, {"switch": switch, "entropy": ent_loss, "z": z}
