"""Truncated SVD of the signed item x user matrix from user partitions, with exact sums (pure; numpy/scipy).

``embedding.method=collab`` factors ``X`` (items x users; ``+like_weight`` / ``-dislike_weight`` times
the event weight, repeats summed). scikit-learn's ``TruncatedSVD`` needs ``X`` in one process. This
module computes a randomized truncated SVD (Halko, Martinsson & Tropp 2011, algorithm 4.4 with a QR
after every power step) in which every product that reads ``X`` is a sum over users, so each user
partition computes its share and only per-item (``items x l``) or ``l x l`` arrays leave it:

1. sketch   ``Y = X W``, ``W`` a Rademacher (±1) matrix, one row per user drawn from a fixed-key
   hash of the user's id and the seed (so a user's row does not depend on which partition holds
   it); ``Q = qr(Y)``;
2. power    ``Y = X (X^T Q)``, ``Q = qr(Y)``, ``n_iter`` times (``X^T Q`` is per user: row-local);
3. gram     ``G = (X^T Q)^T (X^T Q)``, the ``l x l`` Gram of ``B = Q^T X``; its eigenvectors ``V`` and
   eigenvalues ``s^2`` give the item factors ``U S = Q V S`` (scikit-learn's ``fit_transform``),
   signs fixed so each column's largest entry is positive; the explained variance ratio is
   ``sum_c var(U S)[c] / sum_u var(X[:, u])`` (scikit-learn's definition).

**Exact, order-free sums.** A floating-point sum depends on its grouping, so partial sums from
partitions would differ from one process's sum in the last bits, and those bits would move the
k-means codes. Instead every term of a cross-user sum (``X[i, u] * W[u, c]``, ``z_u[a] z_u[b]``,
a user's variance) is rounded to a fixed-point integer (``round(term * 2^s)``, int64) and the
integers are added: integer addition is associative (two's complement wraps, and the total fits by
choice of ``s``), so the sums are the same bits for any partitioning, including one partition
holding every user (the local engine). ``s`` is chosen per pass from bounds made of exact
quantities (maxima and counts): ``|sum| < 2^62``. The resolution is ``2^-s``, about ``2^-62`` of the
bound; the bounds are loose (Cauchy-Schwarz, counts times maxima), so relative to the actual sums it
is coarser, still far below the randomized SVD's own error (the tests compare against an exact SVD). Row-local sums (``X^T Q`` per
user, a user's repeated events) run in the same order wherever the user is. The QR and the
eigendecomposition (LAPACK) run in one process, with a fixed thread count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import scipy.linalg
import scipy.sparse as sp

from conrec_verl.data_prep.errors import DataPrepError

#: extra sketch columns beyond the components (scikit-learn's ``n_oversamples`` default)
OVERSAMPLE = 10
#: the magnitude bound of every fixed-point sum (int64 holds < 2^63)
_TOP_BIT = 62
#: terms of a fixed-point sum rounded per chunk (bounds the temporaries: chunk x l float64)
_CHUNK = 1 << 17

PASSES = ("sketch", "power", "gram")


def user_keys(user_ids) -> np.ndarray:
    """A fixed-key 64-bit hash of each user id's text (the same on every run and machine)."""
    text = pd.Series(user_ids, dtype=object).astype(str).to_numpy(dtype=object)
    return pd.util.hash_array(text).astype(np.uint64)


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def rademacher(keys: np.ndarray, seed: int, width: int) -> np.ndarray:
    """Each user's row of the sketch matrix: ``width`` signs (±1.0) from its key and the seed."""
    base = _splitmix(np.asarray(keys, dtype=np.uint64) ^ _splitmix(np.array([seed & (2**64 - 1)], np.uint64)))
    cols = _splitmix(base[:, None] + np.arange(1, width + 1, dtype=np.uint64)[None, :])
    return np.where(cols >> np.uint64(63), 1.0, -1.0)


def scale_for(bound: float) -> int:
    """The fixed-point exponent ``s`` for sums whose magnitude is at most ``bound``: ``bound * 2^s < 2^62``."""
    if not math.isfinite(bound):
        raise DataPrepError("the signed user x item matrix of the collaborative embeddings has a non-finite value "
                            "(an infinite event weight, or embedding.like_weight / dislike_weight)")
    if not bound > 0:
        return 0
    return _TOP_BIT - math.frexp(bound)[1]  # bound < 2^e


def _fixed(terms: np.ndarray, s: int) -> np.ndarray:
    return np.rint(np.ldexp(terms, s)).astype(np.int64)


def _to_float(total: np.ndarray, s: int) -> np.ndarray:
    return np.ldexp(np.asarray(total).astype(np.float64), -s)


def _to_float_in_place(total: np.ndarray, s: int) -> np.ndarray:
    """``total`` (a writable int64 array) as float64 ``total * 2^-s`` in its own memory, a chunk of
    rows at a time (no second items x width array)."""
    out = total.view(np.float64)
    step = max(1, _CHUNK // max(1, total.shape[1] if total.ndim > 1 else 1))
    for start in range(0, len(total), step):
        out[start:start + step] = np.ldexp(total[start:start + step].astype(np.float64), -s)
    return out


@dataclass
class ItemRows:
    """A partition's share of a per-item sum: only the rows of the items its users touched
    (``items`` ascending), the other items' rows being zero."""

    items: np.ndarray
    rows: np.ndarray


def add_into(total, share, n_items: int):
    """``total`` (``None`` or a tuple of writable int64 arrays) plus one ``share`` (a tuple of int64
    arrays or :class:`ItemRows`), in place where it can. Exact: any order, any grouping."""
    if total is None:
        return tuple(_dense(a, n_items) for a in share)
    for t, a in zip(total, share):
        if isinstance(a, ItemRows):
            t[a.items] += a.rows
        else:
            t += a
    return total


def _dense(a, n_items: int) -> np.ndarray:
    if isinstance(a, ItemRows):
        out = np.zeros((n_items, a.rows.shape[1]), dtype=np.int64)
        out[a.items] = a.rows
        return out
    return np.array(a, dtype=np.int64, copy=True)


@dataclass
class UserBlock:
    """One partition's users' columns of ``X``: ``A`` (users x items, CSR, each row the user's
    signed values by item code, repeats summed in the log's order) and the users' keys
    (:func:`user_keys`). The per-item sums read a CSC copy made per pass (not kept: the block is
    pickled into the object store once, at its CSR size)."""

    keys: np.ndarray
    A: sp.csr_matrix

    @classmethod
    def from_events(cls, user_ids, item_codes, values, n_items: int) -> "UserBlock":
        """From the events of whole users, in the log's order: user ids, item codes (positions in the
        sorted item ids of the whole log) and signed values."""
        df = pd.DataFrame({"u": pd.Series(user_ids, dtype=object).astype(str), "i": np.asarray(item_codes, np.int64),
                           "v": np.asarray(values, np.float64)})
        cell = df.groupby(["u", "i"], sort=True)["v"].sum()  # a user's repeats, summed in event order
        users, rows = np.unique(cell.index.get_level_values(0).to_numpy(dtype=object), return_inverse=True)
        A = sp.csr_matrix((cell.to_numpy(), (rows, cell.index.get_level_values(1).to_numpy())),
                          shape=(len(users), int(n_items)))
        A.sort_indices()
        return cls(user_keys(users), A)

    def stats(self) -> dict:
        """Exact quantities for the global bounds: users, stored values, the largest ``|value|`` and
        every item's count of users."""
        return {"n_users": int(self.A.shape[0]), "nnz": int(self.A.nnz),
                "max_abs": float(np.abs(self.A.data).max()) if self.A.nnz else 0.0,
                "item_users": np.bincount(self.A.indices, minlength=self.A.shape[1]).astype(np.int64)}

    def _item_sums(self, Z: np.ndarray, s: int) -> ItemRows:
        """``sum_u A[u, i] Z[u, :]`` for every item this block's users touched, each term in fixed
        point (int64 rows; the other items' sums are zero)."""
        C = self.A.tocsc()
        C.sort_indices()
        counts = np.diff(C.indptr)
        touched = np.flatnonzero(counts)
        out = np.zeros((len(touched), Z.shape[1]), dtype=np.int64)
        row = np.repeat(np.arange(len(touched)), counts[touched])  # each stored value's row of ``out``
        for start in range(0, C.nnz, _CHUNK):
            stop = min(start + _CHUNK, C.nnz)
            q = _fixed(C.data[start:stop, None] * Z[C.indices[start:stop]], s)
            seg = row[start:stop]
            first = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]])
            out[seg[first]] += np.add.reduceat(q, first, axis=0)
        return ItemRows(touched, out)

    def product(self, state: "SvdState") -> tuple:
        """This partition's fixed-point share of ``state``'s next pass (summed over partitions by
        :func:`add_shares`)."""
        if state.next_pass == "sketch":
            return (self._item_sums(rademacher(self.keys, state.seed, state.width), state.scale),)
        Z = np.asarray(self.A @ state.Q)  # users x width, row-local
        if state.next_pass == "power":
            return (self._item_sums(Z, state.scale),)
        gram = np.zeros((state.width, state.width), dtype=np.int64)
        for start in range(0, len(Z), max(1, _CHUNK // max(1, state.width))):
            z = Z[start:start + max(1, _CHUNK // max(1, state.width))]
            gram += _fixed(z[:, :, None] * z[:, None, :], state.scale).sum(axis=0)
        n = self.A.shape[1]
        s1 = np.asarray(self.A.sum(axis=1)).ravel() / n
        s2 = np.asarray(self.A.multiply(self.A).sum(axis=1)).ravel() / n
        var = np.array([_fixed(s2 - s1 * s1, state.var_scale).sum()], dtype=np.int64)
        return gram, var


def add_shares(shares, n_items: int) -> tuple:
    """The partitions' fixed-point shares summed (exact: any order, any grouping)."""
    total = None
    for share in shares:
        total = add_into(total, share, n_items)
    return total


def merge_stats(stats) -> dict:
    """The partitions' :meth:`UserBlock.stats` combined, in the same form (exact: sums of counts and
    a maximum); none: no user."""
    out = {"n_users": 0, "nnz": 0, "max_abs": 0.0, "item_users": np.zeros(0, np.int64)}
    for st in stats:
        out = {"n_users": out["n_users"] + st["n_users"], "nnz": out["nnz"] + st["nnz"],
               "max_abs": max(out["max_abs"], st["max_abs"]),
               "item_users": st["item_users"] + out["item_users"] if out["item_users"].size else st["item_users"]}
    return out


@dataclass
class SvdState:
    """Where the SVD stands between passes (what the reducing process keeps): the passes left, the
    current basis ``Q`` (items x width) and the fixed-point exponents of the next pass."""

    n_items: int
    stats: dict
    k: int
    width: int
    seed: int
    passes: list
    Q: np.ndarray | None = None
    scale: int = 0
    var_scale: int = 0
    vectors: np.ndarray | None = None
    report: dict = field(default_factory=dict)

    @property
    def next_pass(self) -> str | None:
        return self.passes[0] if self.passes else None


def plan(stats: dict, n_items: int, dim: int, n_iter: int, seed: int) -> SvdState:
    """The first state: ``k = min(dim, min(items, users) - 1)`` components (as scikit-learn's
    ``TruncatedSVD`` allows), ``k + OVERSAMPLE`` sketch columns (at most ``min(items, users)``)."""
    stats = {"n_users": int(stats["n_users"]), "nnz": int(stats["nnz"]), "max_abs": float(stats["max_abs"]),
             "max_item_users": int(np.max(stats["item_users"])) if np.size(stats["item_users"]) else 0}
    n_users = stats["n_users"]
    k = int(min(dim, min(n_items, n_users) - 1))
    if k < 1:
        raise DataPrepError(
            f"the events before the evaluation cutoff hold {n_items} item(s) and {n_users} user(s): "
            "collaborative item embeddings (embedding.method=collab, an SVD of the user x item matrix) need at least "
            "2 of each; check the log (input.path) and the split (split.eval_cutoff_day), or give item embeddings "
            "with embedding.method=content/hf/file")
    if int(n_iter) < 0:
        raise DataPrepError(f"embedding.svd_iters must be >= 0, got {n_iter}")
    width = int(min(k + OVERSAMPLE, n_items, n_users))
    state = SvdState(int(n_items), dict(stats), k, width, int(seed), ["sketch"] + ["power"] * int(n_iter) + ["gram"])
    # sketch: |sum_u X[i,u] W[u,c]| <= (users of i) max|X|
    return replace(state, scale=scale_for(stats["max_item_users"] * stats["max_abs"]))


def advance(state: SvdState, total: tuple) -> SvdState:
    """The state after its next pass, from the summed shares of that pass."""
    kind, rest = state.passes[0], state.passes[1:]
    st = state.stats
    # ||X||_F^2 <= nnz max|X|^2 bounds ||X^T Q||_F^2 (Q orthonormal), hence every Gram entry and,
    # with Cauchy-Schwarz, every power-step sum |sum_u X[i,u] z_u[c]| <= sqrt(users of i) max|X| ||X||_F
    fro2 = st["nnz"] * st["max_abs"] ** 2
    if kind in ("sketch", "power"):
        # the sum becomes the floats in its own memory, then LAPACK's QR in Fortran order (copied once)
        Y = _to_float_in_place(total[0] if total[0].flags.writeable else np.array(total[0]), state.scale)
        Y = np.asfortranarray(Y)
        Q, _ = scipy.linalg.qr(Y, mode="economic", overwrite_a=True, check_finite=False)
        del Y
        nxt = rest[0] if rest else None
        scale = (scale_for(fro2) if nxt == "gram"
                 else scale_for(math.sqrt(st["max_item_users"]) * st["max_abs"] * math.sqrt(fro2)))
        return replace(state, passes=rest, Q=Q, scale=scale,
                       var_scale=scale_for(st["n_users"] * st["max_abs"] ** 2))
    gram = _to_float(total[0], state.scale)
    gram = (gram + gram.T) / 2
    full_var = float(_to_float(total[1], state.var_scale)[0])
    evals, evecs = np.linalg.eigh(gram)
    top = np.argsort(-evals, kind="stable")[:state.k]
    sigma = np.sqrt(np.clip(evals[top], 0.0, None))
    U = state.Q @ evecs[:, top]
    flip = np.sign(U[np.abs(U).argmax(axis=0), np.arange(U.shape[1])])
    U *= np.where(flip == 0, 1.0, flip)
    vectors = U * sigma
    ratio = float(np.var(vectors, axis=0).sum() / full_var) if full_var > 0 else 0.0
    return replace(state, passes=rest, Q=None, vectors=vectors,
                   report={"collab_dim": int(vectors.shape[1]), "collab_explained_variance": round(ratio, 10),
                           "svd": "partitioned"})


def svd_in_process(blocks: list, n_items: int, dim: int, n_iter: int, seed: int) -> SvdState:
    """The whole SVD where every block is in this process (the local engine: one block)."""
    state = plan(merge_stats(b.stats() for b in blocks), n_items, dim, n_iter, seed)
    while state.next_pass:
        state = advance(state, add_shares((b.product(state) for b in blocks), n_items))
    return state
