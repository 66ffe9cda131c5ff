"""A compact SASRec (Kang & McAuley, 2018) trained on negative (dislike) sequences, in torch.

No maintained SASRec package installs cleanly beside verl's pins (the PyPI candidates are
unmaintained or pull their own framework), so this is a small self-contained version: item +
position embeddings, pre-norm causal transformer blocks, next-item prediction with a full softmax
over the catalogue (catalogues of public logs are small), weights tied to the item embeddings.
Rows with an empty negative history fall back to dislike popularity.

Training runs to convergence with early stopping: a seeded ``val_fraction`` of the training
sequences (never evaluation rows or their futures) hold out their last dislike; after every epoch
the model's mean negative log-likelihood of those held-out items is measured, training stops
after ``patience`` epochs without improvement (or at ``epochs``, the cap), and the weights of the
best epoch are kept. Defaults: 64-dim, 2 blocks, 2 heads, dropout 0.2, sequence length 50,
Adam lr 1e-3, batch 128, cap 200 epochs, patience 5, 10% validation sequences.
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
                 epochs: int = 200, batch_size: int = 128, lr: float = 1e-3, patience: int | None = 5,
                 val_fraction: float = 0.1, **kw):
        super().__init__(**kw)
        self.hp = dict(dim=dim, max_len=max_len, layers=layers, heads=heads, dropout=dropout)
        self.epochs, self.batch_size, self.lr = int(epochs), int(batch_size), float(lr)
        self.patience = None if patience is None or int(patience) <= 0 else int(patience)
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"sasrec val_fraction must be in [0, 1), got {val_fraction!r}")
        self.val_fraction = float(val_fraction)
        self.fit_info: dict = {}

    def _fit(self, data) -> None:
        torch.manual_seed(self.seed)
        self.pop = PopularityBaseline().fit(data).counts
        self.net = SASRecNet(len(self.catalogue), **self.hp)
        seqs = [[i + 1 for i in self._known(s)] for s in training_sequences(data)]
        seqs = [s[-(self.hp["max_len"] + 1):] for s in seqs if len(s) >= 2]
        self.losses: list[float] = []
        self.val_nll: list[float] = []
        if not seqs:
            return
        # validation: the last dislike of a seeded share of the sequences (with >= 3 items)
        rng = np.random.default_rng([self.seed, 11])
        eligible = [i for i, s in enumerate(seqs) if len(s) >= 3]
        n_val = int(round(self.val_fraction * len(eligible))) if self.patience else 0
        val_ids = set(rng.permutation(eligible)[:n_val].tolist()) if n_val else set()
        train_seqs = [s[:-1] if i in val_ids else s for i, s in enumerate(seqs)]
        val_prefix = [seqs[i][:-1] for i in sorted(val_ids)]
        val_target = torch.tensor([seqs[i][-1] - 1 for i in sorted(val_ids)], dtype=torch.long)
        T = self.hp["max_len"]
        inputs = _pad_left([s[:-1] for s in train_seqs], T)
        targets = _pad_left([s[1:] for s in train_seqs], T)
        val_x = _pad_left(val_prefix, T) if val_prefix else None
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        best, best_epoch, best_state, stale = float("inf"), 0, None, 0
        for epoch in range(1, self.epochs + 1):
            self.net.train()
            perm = torch.randperm(len(train_seqs), generator=gen)
            total, count = 0.0, 0
            for lo in range(0, len(train_seqs), self.batch_size):
                idx = perm[lo:lo + self.batch_size]
                x, y = inputs[idx], targets[idx]
                valid = y > 0
                if not valid.any():
                    continue
                logits = self.net(x)
                loss = nn.functional.cross_entropy(logits[valid], y[valid] - 1)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * int(valid.sum())
                count += int(valid.sum())
            self.losses.append(total / max(count, 1))
            if val_x is None:
                continue
            self.net.eval()
            with torch.no_grad():
                nll = float(nn.functional.cross_entropy(self.net(val_x)[:, -1, :], val_target))
            self.val_nll.append(nll)
            if nll < best - 1e-4:
                best, best_epoch, stale = nll, epoch, 0
                best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
            else:
                stale += 1
                if stale >= self.patience:
                    break
        if best_state is not None:
            self.net.load_state_dict(best_state)
        self.net.eval()
        self.fit_info = {"epochs_run": len(self.losses), "best_epoch": best_epoch or len(self.losses),
                         "val_sequences": len(val_prefix), "val_nll_best": None if best_state is None else best,
                         "stopped_early": bool(best_state is not None and len(self.losses) < self.epochs)}

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
