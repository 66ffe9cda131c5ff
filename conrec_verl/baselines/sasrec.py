"""A compact SASRec (Kang & McAuley, 2018) trained on negative (dislike) sequences, in torch.

No maintained SASRec package installs cleanly beside verl's pins (the PyPI candidates are
unmaintained or pull their own framework), so this is a small self-contained version: item +
position embeddings, pre-norm causal transformer blocks, next-item prediction with a full softmax
over the catalogue (catalogues of public logs are small), weights tied to the item embeddings.
Rows with an empty negative history fall back to dislike popularity.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from conrec_verl.baselines.base import Baseline, PopularityBaseline, training_sequences


class SASRecNet(nn.Module):
    def __init__(self, n_items: int, dim: int = 64, max_len: int = 50, layers: int = 2, heads: int = 2,
                 dropout: float = 0.2):
        super().__init__()
        self.max_len, self.heads = max_len, heads
        self.items = nn.Embedding(n_items + 1, dim, padding_idx=0)  # 0 = padding
        self.pos = nn.Embedding(max_len, dim)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.items.weight, std=dim ** -0.5)
        nn.init.normal_(self.pos.weight, std=dim ** -0.5)
        with torch.no_grad():
            self.items.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """``seq`` (B, T) left-padded item indices (1-based) -> logits (B, T, n_items)."""
        B, T = seq.shape
        x = self.items(seq) + self.pos(torch.arange(T, device=seq.device))
        x = self.drop(x) * (seq > 0).unsqueeze(-1)
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool, device=seq.device), 1)
        # a query never attends to padding, but always to itself (no all-masked rows -> no NaN)
        blocked = causal.unsqueeze(0) | (seq == 0).unsqueeze(1)
        blocked = blocked & ~torch.eye(T, dtype=torch.bool, device=seq.device).unsqueeze(0)
        mask = torch.zeros(B, T, T, device=seq.device).masked_fill(blocked, float("-inf"))
        h = self.norm(self.encoder(x, mask=mask.repeat_interleave(self.heads, dim=0)))
        return h @ self.items.weight[1:].T


def _pad_left(seqs: list[list[int]], length: int) -> torch.Tensor:
    out = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[-length:]
        if s:
            out[i, length - len(s):] = torch.tensor(s)
    return out


class SASRecBaseline(Baseline):
    name = "sasrec"

    def __init__(self, dim: int = 64, max_len: int = 50, layers: int = 2, heads: int = 2, dropout: float = 0.2,
                 epochs: int = 40, batch_size: int = 128, lr: float = 1e-3, **kw):
        super().__init__(**kw)
        self.hp = dict(dim=dim, max_len=max_len, layers=layers, heads=heads, dropout=dropout)
        self.epochs, self.batch_size, self.lr = int(epochs), int(batch_size), float(lr)

    def _fit(self, data) -> None:
        torch.manual_seed(self.seed)
        self.pop = PopularityBaseline().fit(data).counts
        self.net = SASRecNet(len(self.catalogue), **self.hp)
        seqs = [[i + 1 for i in self._known(s)] for s in training_sequences(data)]
        seqs = [s[-(self.hp["max_len"] + 1):] for s in seqs if len(s) >= 2]
        self.losses: list[float] = []
        if not seqs:
            return
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        T = self.hp["max_len"]
        inputs = _pad_left([s[:-1] for s in seqs], T)
        targets = _pad_left([s[1:] for s in seqs], T)
        self.net.train()
        for _ in range(self.epochs):
            perm = torch.randperm(len(seqs), generator=gen)
            total, count = 0.0, 0
            for lo in range(0, len(seqs), self.batch_size):
                idx = perm[lo:lo + self.batch_size]
                x, y = inputs[idx], targets[idx]
                logits = self.net(x)
                valid = y > 0
                loss = nn.functional.cross_entropy(logits[valid], y[valid] - 1)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * int(valid.sum())
                count += int(valid.sum())
            self.losses.append(total / max(count, 1))
        self.net.eval()

    @torch.no_grad()
    def row_scores(self, rows):
        assert self.data is not None
        hist = [[i + 1 for i in self._known(self.data.rows[r].hist_neg)] for r in rows]
        x = _pad_left(hist, self.hp["max_len"])
        logits = torch.log_softmax(self.net(x)[:, -1, :], dim=-1).numpy().astype(np.float64)
        empty = np.array([len(h) == 0 for h in hist])
        if empty.any():
            logits[empty] = self.pop[None, :]
        return logits
