"""A compact SASRec (Kang & McAuley, 2018) trained on negative (dislike) sequences, in torch.

No maintained SASRec package installs cleanly beside verl's pins (the PyPI candidates are
unmaintained or pull their own framework), so this is a small self-contained version: item +
position embeddings, pre-norm causal transformer blocks, next-item prediction with a full softmax
over the catalogue (catalogues of public logs are small), weights tied to the item embeddings.
Rows with an empty negative history fall back to dislike popularity.

Training runs to convergence with early stopping: a seeded ``val_fraction`` of the training
sequences (never evaluation rows or their futures) hold out their last dislike; after every epoch
the validation hit rate of those held-out items is measured (FHR-like: any of the last ``val_items``
dislikes in the top ``val_k``; the sequence's own earlier items excluded, as the evaluation
excludes known items; ties broken by the mean negative log-likelihood), training stops after
``patience`` epochs without improvement (or at ``epochs``, the cap), and the model is then
refitted from scratch on every whole sequence for the best epoch count (same seed). The criterion is the ranking metric on
purpose: the held-out log-likelihood bottoms out after ~12 epochs on MovieLens-100K while the
ranking keeps improving until ~45 (FHR@20 0.29 vs 0.39 on the full split); the validation hit
rate has an early bump (epoch ~6) and a dip before its maximum, hence the long patience and a
validation set of every sequence long enough (a 20% subset was too noisy and stopped in the dip).
Defaults: 64-dim, 2 blocks, 2 heads, dropout 0.2, sequence length 50, Adam lr 1e-3, batch 128,
cap 200 epochs, patience 20, every sequence with >= 7 dislikes holding out its last 5, val_k 20.

``target_span`` > 1 trains each position on its next ``target_span`` dislikes instead of the next
one ("dense all-action": the cross-entropy averaged over every (position, later item) pair), the
sequence-model analogue of warm-up SFT's ``sft.warmup.targets: window`` (the sequences carry no
timestamps, so the window is counted in items). Default 1: the original next-item loss.
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
                 epochs: int = 200, batch_size: int = 128, lr: float = 1e-3, patience: int | None = 20,
                 val_fraction: float = 1.0, val_k: int = 20, val_items: int = 5, target_span: int = 1, **kw):
        super().__init__(**kw)
        self.hp = dict(dim=dim, max_len=max_len, layers=layers, heads=heads, dropout=dropout)
        self.epochs, self.batch_size, self.lr = int(epochs), int(batch_size), float(lr)
        self.patience = None if patience is None or int(patience) <= 0 else int(patience)
        if not 0.0 <= float(val_fraction) <= 1.0:
            raise ValueError(f"sasrec val_fraction must be in [0, 1], got {val_fraction!r}")
        self.val_fraction = float(val_fraction)
        self.val_k = int(val_k)
        self.val_items = max(1, int(val_items))
        if int(target_span) < 1:
            raise ValueError(f"sasrec target_span must be >= 1, got {target_span!r}")
        self.target_span = int(target_span)
        self.fit_info: dict = {}

    def _fit(self, data) -> None:
        self.pop = PopularityBaseline().fit(data).counts
        seqs = [[i + 1 for i in self._known(s)] for s in training_sequences(data)]
        seqs = [s[-(self.hp["max_len"] + 1):] for s in seqs if len(s) >= 2]
        self.losses: list[float] = []
        self.val_nll: list[float] = []
        self.val_hr: list[float] = []
        self.net = self._new_net()
        if not seqs:
            return
        v = self.val_items
        rng = np.random.default_rng([self.seed, 11])
        eligible = [i for i, s in enumerate(seqs) if len(s) >= v + 2]
        n_val = int(round(self.val_fraction * len(eligible))) if self.patience else 0
        val_ids = sorted(rng.permutation(eligible)[:n_val].tolist()) if n_val else []
        if not val_ids:  # no early stopping: every epoch on every sequence
            self.losses = self._train(self.net, seqs, self.epochs)
            self.net.eval()
            self.fit_info = {"epochs_run": len(self.losses), "best_epoch": len(self.losses), "val_sequences": 0,
                             "stopped_early": False}
            return
        # 1) choose the epoch count: hold out the last ``val_items`` dislikes of a seeded share of the
        #    sequences and score them like FHR (any of them in the top K after the prefix)
        held = set(val_ids)
        probe = self._new_net()
        val = (_pad_left([seqs[i][:-v] for i in val_ids], self.hp["max_len"]),
               torch.tensor([[x - 1 for x in seqs[i][-v:]] for i in val_ids], dtype=torch.long))
        probe_losses = self._train(probe, [s[:-v] if i in held else s for i, s in enumerate(seqs)], self.epochs, val)
        best = max(range(len(self.val_hr)), key=lambda e: (self.val_hr[e], -self.val_nll[e]))
        best_epoch = best + 1
        # 2) refit on every sequence, whole, for that many epochs (same seed)
        self.losses = self._train(self.net, seqs, best_epoch)
        self.net.eval()
        self.fit_info = {"epochs_run": len(probe_losses), "best_epoch": best_epoch, "val_sequences": len(val_ids),
                         "val_hr_best": round(self.val_hr[best], 4), "val_nll_at_best": round(self.val_nll[best], 4),
                         "stopped_early": len(probe_losses) < self.epochs}

    def _new_net(self) -> SASRecNet:
        torch.manual_seed(self.seed)
        return SASRecNet(len(self.catalogue), **self.hp)

    def _train(self, net: SASRecNet, seqs: list[list[int]], epochs: int, val=None) -> list[float]:
        """Train ``net`` for up to ``epochs``; with ``val = (prefixes, held-out items)`` record the
        validation hit rate/NLL per epoch and stop after ``patience`` epochs without improvement."""
        T = self.hp["max_len"]
        inputs = _pad_left([s[:-1] for s in seqs], T)
        # (N, T, span): position i of s[:-1] learns s[i + o] for o = 1..span (0 = none)
        targets = torch.stack([_pad_left([s[o:] + [0] * (o - 1) for s in seqs], T)
                               for o in range(1, self.target_span + 1)], dim=2)
        opt = torch.optim.Adam(net.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)  # dropout draws: a refit repeats the run it stands for
        losses: list[float] = []
        best, stale = (-1.0, 0.0), 0
        for _ in range(int(epochs)):
            net.train()
            perm = torch.randperm(len(seqs), generator=gen)
            total, count = 0.0, 0
            for lo in range(0, len(seqs), self.batch_size):
                idx = perm[lo:lo + self.batch_size]
                x, y = inputs[idx], targets[idx]
                valid = y > 0
                if not valid.any():
                    continue
                logits = net(x)
                if self.target_span == 1:
                    y, valid = y[..., 0], valid[..., 0]
                else:  # every (position, later item) pair: the position's logits once per target
                    logits = logits.unsqueeze(2).expand(-1, -1, self.target_span, -1)
                loss = nn.functional.cross_entropy(logits[valid], y[valid] - 1)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * int(valid.sum())
                count += int(valid.sum())
            losses.append(total / max(count, 1))
            if val is None:
                continue
            hr, nll = self._validate(net, *val)
            self.val_hr.append(hr)
            self.val_nll.append(nll)
            if (hr, -nll) > best:
                best, stale = (hr, -nll), 0
            else:
                stale += 1
                if self.patience is not None and stale >= self.patience:
                    break
        return losses

    @torch.no_grad()
    def _validate(self, net: SASRecNet, val_x: torch.Tensor, val_target: torch.Tensor) -> tuple[float, float]:
        net.eval()
        logits = net(val_x)[:, -1, :]
        n_held = val_target.shape[1]
        nll = float(nn.functional.cross_entropy(logits.repeat_interleave(n_held, 0), val_target.reshape(-1)))
        n = logits.shape[1]
        seen = torch.where(val_x > 0, val_x - 1, n)  # the prefix's own items; padding -> a spare column
        masked = torch.cat([logits, logits.new_zeros(len(logits), 1)], dim=1).scatter(1, seen, float("-inf"))[:, :n]
        top = masked.topk(min(self.val_k, n), dim=1).indices
        hr = float((top.unsqueeze(2) == val_target.unsqueeze(1)).any(dim=2).any(dim=1).float().mean())
        return hr, nll

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
