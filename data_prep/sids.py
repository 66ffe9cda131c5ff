"""Semantic IDs: residual k-means (faiss, default) or RQ-VAE (torch), then a one-to-one repair.

Codebooks are fitted on the *warm* items only (those with events before the embedding cutoff);
cold items that have an embedding (from content) are quantised with the fitted codebooks.

Collision resolution (SID -> item must be one-to-one for exact-hit metrics):
items sharing a SID are ordered by their distance to the SID's reconstruction (ties: item id);
the closest keeps it. Every other item, in order of that distance, moves to the nearest *free*
last-level codeword under the same prefix (distance between its last-level residual and the
codeword). When the prefix is full it moves to the nearest non-full prefix (distance between the
item and the prefix reconstruction; a widening beam search when there are more than 2^17
prefixes), then to that prefix's nearest free last-level codeword. Earlier levels therefore never
change unless a prefix is full, and the repaired SID stays close to the item.

``sid.collisions: extra_level`` instead keeps every item's quantised SID and appends one
disambiguation level (as generative retrieval models do): the item closest to the SID's
reconstruction gets code 0, the next 1, ... (ties: item id). That level's codewords are zero
vectors, so an item's reconstructed embedding -- what the reward and the deployment filter compare
-- is exactly its quantised one, and no item is moved to a code that describes another item. The
level is as large as the largest collision group (reported as ``dedup_level_size``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from conrec_verl.core.sid import Codebook
from conrec_verl.data_prep.errors import DataPrepError


@dataclass
class SidResult:
    codebook: Codebook
    codes: np.ndarray          # (n, L) int64, one-to-one
    codes_before: np.ndarray   # (n, L) before collision repair
    report: dict


def check_sizes(sizes: Sequence[int], n_fit: int, n_total: int, one_to_one: bool = True) -> None:
    sizes = [int(s) for s in sizes]
    if not sizes or any(s < 1 for s in sizes):
        raise DataPrepError(f"sid.sizes must be a non-empty list of positive integers, got {sizes}")
    if len(sizes) > 8 - (0 if one_to_one else 1):
        raise DataPrepError(f"sid.sizes has {len(sizes)} levels; at most {8 - (0 if one_to_one else 1)} are supported"
                            + ("" if one_to_one else " with sid.collisions=extra_level (it adds one)"))
    too_big = [s for s in sizes if s > n_fit]
    if too_big:
        raise DataPrepError(
            f"codebook too large for the number of items: sid.sizes={sizes} but only {n_fit} items are available "
            f"to fit it (every level needs at most {n_fit} codewords); lower sid.sizes")
    if one_to_one and math.prod(sizes) < n_total:
        raise DataPrepError(
            f"codebook too small: sid.sizes={sizes} gives {math.prod(sizes)} SIDs for {n_total} items, so SIDs "
            "cannot be one-to-one; raise sid.sizes")


# -- residual k-means ---------------------------------------------------------------------------

def residual_kmeans(x: np.ndarray, sizes: Sequence[int], seed: int, niter: int = 20) -> list[np.ndarray]:
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    residual = x.copy()
    codewords = []
    for level, k in enumerate(sizes):
        km = faiss.Kmeans(x.shape[1], int(k), niter=int(niter), seed=int(seed) + level, verbose=False,
                          min_points_per_centroid=1, spherical=False)
        km.train(residual)
        cents = np.asarray(km.centroids, dtype=np.float32).reshape(int(k), x.shape[1])
        codes = _nearest(residual, cents)
        residual = residual - cents[codes]
        codewords.append(cents)
    return codewords


def _nearest(x: np.ndarray, cents: np.ndarray, chunk: int = 65536) -> np.ndarray:
    out = np.empty(len(x), dtype=np.int64)
    c2 = (cents.astype(np.float64) ** 2).sum(1)
    for s in range(0, len(x), chunk):
        xs = x[s:s + chunk].astype(np.float64)
        d = c2[None, :] - 2.0 * xs @ cents.astype(np.float64).T
        out[s:s + chunk] = np.argmin(d, axis=1)
    return out


def quantize(x: np.ndarray, codewords: Sequence[np.ndarray]) -> np.ndarray:
    """Greedy residual quantisation: the nearest codeword at each level."""
    residual = np.asarray(x, dtype=np.float32).copy()
    codes = np.empty((len(residual), len(codewords)), dtype=np.int64)
    for level, cents in enumerate(codewords):
        c = _nearest(residual, cents)
        codes[:, level] = c
        residual -= cents[c]
    return codes


# -- RQ-VAE --------------------------------------------------------------------------------------

def rqvae(x: np.ndarray, sizes: Sequence[int], seed: int, cfg: Mapping,
          encode: np.ndarray | None = None) -> tuple[list[np.ndarray], np.ndarray, dict]:
    """Train an RQ-VAE on ``x``; returns latent-space codebooks, the latents of ``encode``
    (default ``x``) and training stats.

    Loss = reconstruction MSE + codebook loss + beta * commitment loss. With ``ema=true`` (default)
    codewords follow exponential moving averages of their assigned residuals (the codebook term
    is then reported but carries no gradient) and dead codewords are restarted from batch residuals.
    """
    import torch
    from torch import nn
    from tqdm.auto import tqdm

    torch.manual_seed(int(seed))
    gen = torch.Generator().manual_seed(int(seed))
    X = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    d = X.shape[1]
    latent = int(cfg.get("latent_dim", 32))
    hidden = int(cfg.get("hidden_dim", 128))
    ema = bool(cfg.get("ema", True))
    decay = float(cfg.get("ema_decay", 0.95))
    beta = float(cfg.get("commitment", 0.25))
    enc = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, latent))
    dec = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, d))
    with torch.no_grad():
        z0 = enc(X)
        init = residual_kmeans(z0.numpy(), sizes, seed, niter=10)
    books = [torch.tensor(c) for c in init]
    params = list(enc.parameters()) + list(dec.parameters())
    if not ema:
        books = [nn.Parameter(b) for b in books]
        params += books
    cluster = [torch.ones(int(k)) for k in sizes]
    sums = [b.detach().clone() for b in books]
    opt = torch.optim.Adam(params, lr=float(cfg.get("lr", 1e-3)))
    bs = int(cfg.get("batch_size", 1024))
    epochs = int(cfg.get("epochs", 30))
    last = {}
    for _ in tqdm(range(epochs), desc="rq-vae", leave=False):
        perm = torch.randperm(len(X), generator=gen)
        for s in range(0, len(X), bs):
            xb = X[perm[s:s + bs]]
            z = enc(xb)
            residual = z
            zq = torch.zeros_like(z)
            commit = torch.zeros(())
            cbl = torch.zeros(())
            for level, book in enumerate(books):
                idx = torch.cdist(residual.detach(), book.detach()).argmin(1)
                q = book[idx]
                commit = commit + ((residual - q.detach()) ** 2).mean()
                cbl = cbl + ((q - residual.detach()) ** 2).mean()
                if ema:
                    with torch.no_grad():
                        onehot = torch.nn.functional.one_hot(idx, book.shape[0]).float()
                        cluster[level].mul_(decay).add_(onehot.sum(0), alpha=1 - decay)
                        sums[level].mul_(decay).add_(onehot.T @ residual.detach(), alpha=1 - decay)
                        n = cluster[level].sum()
                        size = (cluster[level] + 1e-5) / (n + book.shape[0] * 1e-5) * n
                        book.copy_(sums[level] / size[:, None])
                        dead = cluster[level] < 1e-3
                        if dead.any():
                            pick = torch.randint(0, len(residual), (int(dead.sum()),), generator=gen)
                            book[dead] = residual.detach()[pick]
                            sums[level][dead] = book[dead]
                            cluster[level][dead] = 1.0
                zq = zq + q
                residual = residual - q.detach()
            z_st = z + (zq - z).detach()
            recon = ((dec(z_st) - xb) ** 2).mean()
            loss = recon + beta * commit + (0.0 if ema else cbl)
            opt.zero_grad()
            loss.backward()
            opt.step()
            last = {"recon": float(recon.detach()), "commitment": float(commit.detach()), "codebook": float(cbl.detach())}
    with torch.no_grad():
        src = X if encode is None else torch.from_numpy(np.ascontiguousarray(encode, dtype=np.float32))
        Z = enc(src).numpy()
    return [b.detach().numpy().astype(np.float32) for b in books], Z.astype(np.float32), {"rqvae_final_loss": last}


# -- collisions ----------------------------------------------------------------------------------

def _keys(codes: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    key = np.zeros(len(codes), dtype=np.int64)
    for level, s in enumerate(sizes):
        key = key * int(s) + codes[:, level]
    return key


def _recon(codes: np.ndarray, codewords: Sequence[np.ndarray], upto: int) -> np.ndarray:
    out = np.zeros((len(codes), codewords[0].shape[1]), dtype=np.float32)
    for level in range(upto):
        out += codewords[level][codes[:, level]]
    return out


def _beam_free(x: np.ndarray, codewords, sizes, used: set, full: set, width: int):
    """Nearest free SID for one vector ``x`` by a beam search over prefixes."""
    L = len(codewords)
    beams = [((), x)]
    for level in range(L - 1):
        cand = []
        for prefix, r in beams:
            d = ((codewords[level] - r) ** 2).sum(1)
            for c in np.argsort(d, kind="stable")[:width]:
                cand.append((float(d[c]), prefix + (int(c),), r - codewords[level][c]))
        cand.sort(key=lambda t: (t[0], t[1]))
        beams = [(p, r) for _, p, r in cand[:width]]
    best = None
    for prefix, r in beams:
        pk = 0
        for level in range(L - 1):
            pk = pk * int(sizes[level]) + prefix[level]
        if pk in full:
            continue
        d = ((codewords[L - 1] - r) ** 2).sum(1)
        for c in np.argsort(d, kind="stable"):
            codes = prefix + (int(c),)
            key = 0
            for level, s in enumerate(sizes):
                key = key * int(s) + codes[level]
            if key not in used:
                if best is None or d[c] < best[0]:
                    best = (float(d[c]), codes, key)
                break
    return best


def resolve_collisions(x: np.ndarray, codes: np.ndarray, codewords: Sequence[np.ndarray],
                       order_ids: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Make ``codes`` one-to-one (see the module docstring). ``order_ids`` breaks distance ties."""
    sizes = [len(c) for c in codewords]
    L = len(sizes)
    codes = codes.copy()
    n = len(codes)
    keys = _keys(codes, sizes)
    dist = ((x - _recon(codes, codewords, L)) ** 2).sum(1)
    tie = np.arange(n) if order_ids is None else np.argsort(np.argsort(order_ids.astype(str), kind="stable"))
    order = np.lexsort((tie, dist, keys))
    sorted_keys = keys[order]
    first = np.ones(n, dtype=bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    movers = order[~first]
    stats = {"items": int(n), "colliding_items_before": int(np.isin(keys, sorted_keys[~first]).sum()),
             "moved": int(len(movers))}
    if len(movers) == 0:
        return codes, stats
    movers = movers[np.lexsort((tie[movers], dist[movers]))]
    used = set(keys[order[first]].tolist())
    last = codewords[L - 1]
    prefix_fallbacks = 0
    fill: dict[int, int] = {}
    for k in used:
        fill[k // sizes[L - 1]] = fill.get(k // sizes[L - 1], 0) + 1
    full = {k for k, v in fill.items() if v >= sizes[L - 1]}
    prefix_table = prefix_sq = None
    chunk = 8192
    for s in range(0, len(movers), chunk):
        idx = movers[s:s + chunk]
        r = x[idx] - _recon(codes[idx], codewords, L - 1)
        d = (last.astype(np.float64) ** 2).sum(1)[None, :] - 2.0 * r.astype(np.float64) @ last.astype(np.float64).T
        ranked = np.argsort(d, axis=1, kind="stable")
        prefix_keys = _keys(codes[idx, : L - 1], sizes[: L - 1]) * sizes[L - 1] if L > 1 else np.zeros(len(idx), np.int64)
        for row, item in enumerate(idx):
            base = int(prefix_keys[row])
            for c in (() if base // sizes[L - 1] in full else ranked[row]):
                key = base + int(c)
                if key not in used:
                    used.add(key)
                    codes[item, L - 1] = int(c)
                    pk = base // sizes[L - 1]
                    fill[pk] = fill.get(pk, 0) + 1
                    if fill[pk] >= sizes[L - 1]:
                        full.add(pk)
                    break
            else:
                prefix_fallbacks += 1
                n_prefixes = math.prod(sizes[:-1])
                if prefix_table is None and L > 1 and n_prefixes <= 1 << 17:
                    grid = np.stack(np.unravel_index(np.arange(n_prefixes), sizes[:-1]), axis=1)
                    prefix_table = _recon(grid, codewords, L - 1).astype(np.float64)
                    prefix_sq = (prefix_table ** 2).sum(1)
                if prefix_table is not None:
                    dp = prefix_sq - 2.0 * prefix_table @ x[item].astype(np.float64)
                    found = None
                    for pk in np.argsort(dp, kind="stable"):
                        if int(pk) in full:
                            continue
                        pref = np.unravel_index(int(pk), sizes[:-1])
                        r1 = x[item] - prefix_table[pk]
                        dl = ((last - r1) ** 2).sum(1)
                        for c in np.argsort(dl, kind="stable"):
                            key = int(pk) * sizes[L - 1] + int(c)
                            if key not in used:
                                found = (float(dl[c]), tuple(int(v) for v in pref) + (int(c),), key)
                                break
                        if found is not None:
                            break
                    if found is None:
                        raise DataPrepError("no free SID left; raise sid.sizes")
                    width = n_prefixes
                else:
                    width = 4
                while width < n_prefixes or prefix_table is None:
                    found = _beam_free(x[item], codewords, sizes, used, full, min(width, n_prefixes))
                    if found is not None or width >= n_prefixes:
                        break
                    width *= 4
                if found is None:  # cannot happen when prod(sizes) >= n; kept as a guard
                    raise DataPrepError("no free SID left; raise sid.sizes")
                used.add(found[2])
                codes[item] = found[1]
                pk = found[2] // sizes[L - 1]
                fill[pk] = fill.get(pk, 0) + 1
                if fill[pk] >= sizes[L - 1]:
                    full.add(pk)
    stats["moved_to_other_prefix"] = int(prefix_fallbacks)
    return codes, stats


# -- report --------------------------------------------------------------------------------------

def level_stats(codes: np.ndarray, sizes: Sequence[int]) -> list[dict]:
    out = []
    for level, size in enumerate(sizes):
        counts = np.bincount(codes[:, level], minlength=int(size)).astype(np.float64)
        p = counts[counts > 0] / max(counts.sum(), 1)
        h = float(-(p * np.log2(p)).sum()) if len(p) else 0.0
        out.append({"level": level, "size": int(size), "used": int((counts > 0).sum()),
                    "utilisation": float((counts > 0).mean()), "entropy_bits": h,
                    "entropy_normalised": h / math.log2(size) if size > 1 else 0.0})
    return out


def collision_stats(codes: np.ndarray, sizes: Sequence[int]) -> dict:
    keys = _keys(codes, sizes)
    uniq, counts = np.unique(keys, return_counts=True)
    n = len(keys)
    return {"unique_sids": int(len(uniq)),
            "collision_rate": float(1 - len(uniq) / n) if n else 0.0,
            "items_in_collisions": int(counts[counts > 1].sum()),
            "max_items_per_sid": int(counts.max()) if n else 0}


def build_sids(vectors: np.ndarray, fit_mask: np.ndarray, item_ids: np.ndarray, cfg: Mapping, seed: int) -> SidResult:
    """Fit the codebook on ``vectors[fit_mask]`` and give every row a one-to-one SID."""
    sizes = [int(s) for s in cfg.get("sizes", [32, 32, 32])]
    how = cfg.get("collisions", "repair") or "repair"
    if how not in ("repair", "extra_level"):
        raise DataPrepError(f"sid.collisions must be repair or extra_level, got {how!r}")
    # the repair needs a free SID per item; the extra level makes every SID unique whatever the sizes
    check_sizes(sizes, int(fit_mask.sum()), len(vectors), one_to_one=how == "repair")
    method = cfg.get("method", "rkmeans")
    extra: dict = {}
    if method == "rkmeans":
        codewords = residual_kmeans(vectors[fit_mask], sizes, seed, int(cfg.get("kmeans_iters", 20)))
        space = vectors
    elif method == "rqvae":
        # latents of every item (warm and cold) through the trained encoder
        codewords, space, extra = rqvae(vectors[fit_mask], sizes, seed, cfg.get("rqvae", {}) or {}, encode=vectors)
    else:
        raise DataPrepError(f"sid.method must be rkmeans or rqvae, got {method!r}")
    before = quantize(space, codewords)
    rel = lambda c: float((((space - _recon(c, codewords, len(sizes))) ** 2).sum(1)).mean()
                          / max(float((space ** 2).sum(1).mean()), 1e-12))
    rel_before = rel(before)
    if how == "repair":
        after, moved = resolve_collisions(space, before, codewords, item_ids)
        out_sizes, rel_after, before_full = sizes, rel(after), before
    elif how == "extra_level":
        after, moved = disambiguation_level(space, before, codewords, item_ids)
        dedup = int(after[:, -1].max()) + 1
        codewords = list(codewords) + [np.zeros((dedup, codewords[0].shape[1]), dtype=np.float32)]
        out_sizes = sizes + [dedup]
        rel_after = rel_before  # the extra level adds zero vectors: reconstructions are unchanged
        before_full = np.hstack([before, np.zeros((len(before), 1), dtype=before.dtype)])
    else:
        raise DataPrepError(f"sid.collisions must be repair or extra_level, got {how!r}")
    book = Codebook(codewords, meta={"method": method, "space": "embedding" if method == "rkmeans" else "rqvae_latent",
                                     "seed": int(seed), "sizes": out_sizes, "collisions": how})
    report = {"method": method, "sizes": out_sizes, "collisions": how, "items": int(len(vectors)),
              "fit_items": int(fit_mask.sum()),
              "before": collision_stats(before, sizes), "after": collision_stats(after, out_sizes),
              "repair": moved, "levels": level_stats(after, out_sizes),
              "levels_before_repair": level_stats(before, sizes),
              "relative_reconstruction_error": {"before": rel_before, "after": rel_after}, **extra}
    return SidResult(book, after, before_full, report)


def disambiguation_level(x: np.ndarray, codes: np.ndarray, codewords: Sequence[np.ndarray],
                         order_ids: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """``codes`` plus one column: each item's rank inside its collision group, by distance to the
    SID's reconstruction (ties: ``order_ids``). Every SID stays as quantised; the result is one-to-one."""
    sizes = [len(c) for c in codewords]
    n = len(codes)
    keys = _keys(codes, sizes)
    dist = ((x - _recon(codes, codewords, len(sizes))) ** 2).sum(1)
    tie = np.arange(n) if order_ids is None else np.argsort(np.argsort(order_ids.astype(str), kind="stable"))
    order = np.lexsort((tie, dist, keys))
    sk = keys[order]
    starts = np.r_[True, sk[1:] != sk[:-1]]
    group_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    rank = np.empty(n, dtype=codes.dtype)
    rank[order] = np.arange(n) - group_start
    stats = {"items": int(n), "colliding_items_before": int(np.isin(keys, sk[~starts]).sum()),
             "moved": 0, "moved_to_other_prefix": 0, "dedup_level_size": int(rank.max()) + 1 if n else 0}
    return np.hstack([codes, rank[:, None]]), stats
