"""Item embeddings, built only from what is known at the embedding cutoff.

* ``collab``  -- truncated SVD of the signed user x item matrix (+like_weight / -dislike_weight),
  built from the interactions *before* the cutoff only. Items first seen later are cold.
  ``svd``: ``sklearn`` (scikit-learn's randomized ``TruncatedSVD``, the matrix in one process) or
  ``partitioned`` (:mod:`data_prep.partitioned_svd`: the same kind of solver from per-user-partition
  products with exact sums, what ``engine=ray`` runs on the cluster; ``auto`` picks it there and
  scikit-learn's otherwise).
* ``content`` -- TF-IDF of title + description, one-hot categories, standardised numeric features,
  reduced by truncated SVD (fitted on warm items; no pretrained weights needed).
* ``hf``      -- mean-pooled last hidden states of a local Hugging Face encoder over item text
  (``local_files_only``: nothing is downloaded).
* ``file``    -- a user-supplied parquet (``item_id`` + ``embedding`` list column) or ``.npz``
  (``item_id`` and ``embedding`` arrays).

With ``collab`` and ``cold_from_content=true`` cold items that have content are placed in the
collaborative space by a ridge regression content -> collab fitted on warm items (source
``content``). Item content is not an event, so using it for cold items leaks nothing from the
future.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp

from conrec_verl.data_prep import partitioned_svd as PS
from conrec_verl.data_prep.errors import DataPrepError
from conrec_verl.data_prep.train_codes import TrainCodes

SVD_SOLVERS = ("auto", "sklearn", "partitioned")


@dataclass
class CollabFactors:
    """The training items (sorted ids) and, for ``embedding.method=collab``, their SVD factors,
    computed where the training events are (``engine=ray``: on the partitions,
    :func:`data_prep.distributed.collab_factors_ray`); :func:`build_item_embeddings` takes it in place
    of the :class:`TrainCodes`."""

    items: np.ndarray
    vectors: np.ndarray | None
    stats: dict


@dataclass
class ItemEmbeddings:
    item_ids: np.ndarray      # object array of str
    vectors: np.ndarray       # float32 (n, dim)
    source: np.ndarray        # object array: collab | content | file
    stats: dict


def _l2(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _svd(matrix, dim: int, seed: int) -> tuple[np.ndarray, object]:
    from sklearn.decomposition import TruncatedSVD

    k = int(min(dim, min(matrix.shape) - 1))
    if k < 1:
        raise DataPrepError(
            f"the events before the evaluation cutoff hold {matrix.shape[0]} item(s) and {matrix.shape[1]} user(s): "
            "collaborative item embeddings (embedding.method=collab, an SVD of the user x item matrix) need at least "
            "2 of each; check the log (input.path) and the split (split.eval_cutoff_day), or give item embeddings "
            "with embedding.method=content/hf/file")
    svd = TruncatedSVD(n_components=k, algorithm="randomized", n_iter=5, random_state=seed)
    return svd.fit_transform(matrix), svd


def svd_solver(cfg: Mapping, on_cluster: bool) -> str:
    """``embedding.svd`` resolved: ``auto`` is ``partitioned`` where the training events are on a
    Ray cluster (nothing else reads them there) and ``sklearn`` otherwise."""
    solver = str(cfg.get("svd", "auto"))
    if solver not in SVD_SOLVERS:
        raise DataPrepError(f"embedding.svd must be one of {', '.join(SVD_SOLVERS)}, got {solver!r}")
    if solver == "auto":
        return "partitioned" if on_cluster else "sklearn"
    if solver == "sklearn" and on_cluster and cfg.get("method", "collab") == "collab":
        raise DataPrepError("embedding.svd=sklearn needs the whole user x item matrix in one process; with "
                            "engine=ray and a log read on the cluster the SVD runs on the user partitions: set "
                            "embedding.svd=partitioned (or auto)")
    return solver


def signed_values(polarity: np.ndarray, weight: np.ndarray, like_weight: float, dislike_weight: float) -> np.ndarray:
    """Each event's value in the signed matrix: ``+like_weight`` or ``-dislike_weight`` times its weight."""
    return np.where(np.asarray(polarity) > 0, like_weight, -dislike_weight) * np.asarray(weight).astype(np.float64)


def collaborative(train: TrainCodes, dim: int, like_weight: float, dislike_weight: float, seed: int,
                  solver: str = "sklearn", n_iter: int = 5):
    """Item ids (sorted) and their SVD factors from the signed matrix of the ``train`` events."""
    vals = signed_values(train.polarity, train.weight, like_weight, dislike_weight)
    if solver == "partitioned":  # the local engine: every user in one block
        block = PS.UserBlock.from_events(train.users[train.user], train.item, vals, len(train.items))
        state = PS.svd_in_process([block], len(train.items), dim, n_iter, seed)
        return np.asarray(train.items, dtype=object), state.vectors.astype(np.float32), state.report
    m = sp.csr_matrix((vals, (train.item, train.user)), shape=(len(train.items), len(train.users)))
    m.sum_duplicates()
    vecs, svd = _svd(m, dim, seed)
    # the ratio to 10 decimals: its last bits follow the memory alignment of numpy's summation, and
    # the report is compared byte for byte between engines (the vectors themselves are unaffected)
    return np.asarray(train.items, dtype=object), vecs.astype(np.float32), {
        "collab_dim": int(vecs.shape[1]),
        "collab_explained_variance": round(float(svd.explained_variance_ratio_.sum()), 10)}


def has_content(items: pd.DataFrame | None) -> bool:
    return items is not None and any(c in items.columns for c in ("title", "description", "category")) or (
        items is not None and any(c.startswith("num_") for c in items.columns))


def content_matrix(items: pd.DataFrame, fit_mask: np.ndarray):
    """Sparse TF-IDF + one-hot + numeric features of every row of ``items``; vocabularies and scales
    are fitted on the rows in ``fit_mask`` only."""
    from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer

    blocks = []
    fit_rows = items[fit_mask]
    text = None
    for col in ("title", "description"):
        if col in items.columns:
            text = items[col] if text is None else text + " " + items[col]
    if text is not None and text.str.strip().str.len().gt(0).any():
        tfidf = TfidfVectorizer(min_df=1, token_pattern=r"(?u)\b\w+\b", sublinear_tf=True)
        try:
            tfidf.fit(text[fit_mask])
            blocks.append(tfidf.transform(text))
        except ValueError:  # empty vocabulary among fitted rows
            pass
    if "category" in items.columns:
        cv = CountVectorizer(tokenizer=lambda s: [t.strip() for t in s.split("|") if t.strip()],
                             lowercase=False, binary=True, token_pattern=None)
        try:
            cv.fit(fit_rows["category"])
            blocks.append(cv.transform(items["category"]).astype(np.float64))
        except ValueError:
            pass
    num_cols = [c for c in items.columns if c.startswith("num_")]
    if num_cols:
        x = items[num_cols].to_numpy(dtype=np.float64)
        mu = x[fit_mask].mean(axis=0)
        sd = x[fit_mask].std(axis=0)
        blocks.append(sp.csr_matrix((x - mu) / np.where(sd > 0, sd, 1.0)))
    if not blocks:
        raise DataPrepError("item metadata has no usable content (title, description, category or numeric columns)")
    return sp.hstack(blocks).tocsr()


def content_embeddings(items: pd.DataFrame, fit_mask: np.ndarray, dim: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import TruncatedSVD

    X = content_matrix(items, fit_mask)
    k = int(min(dim, X.shape[1] - 1, int(fit_mask.sum()) - 1))
    if k < 1:
        return X.toarray().astype(np.float32)
    svd = TruncatedSVD(n_components=k, algorithm="randomized", n_iter=5, random_state=seed)
    svd.fit(X[fit_mask])
    return svd.transform(X).astype(np.float32)


def hf_embeddings(texts: list[str], model_path: str, batch_size: int = 64, max_length: int = 64) -> np.ndarray:
    """Mean-pooled encoder states of ``texts`` from a local HF model folder (no download)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    if not model_path or not os.path.isdir(model_path):
        raise DataPrepError("embedding.hf_model_path must be a local model folder", file=model_path)
    tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = AutoModel.from_pretrained(model_path, local_files_only=True).eval()
    out = []
    with torch.no_grad():
        for start in tqdm(range(0, len(texts), batch_size), desc="hf item embeddings", leave=False):
            enc = tok(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().numpy())
    return np.concatenate(out).astype(np.float32)


def file_embeddings(path: str) -> tuple[np.ndarray, np.ndarray]:
    if not path or not os.path.isfile(path):
        raise DataPrepError("embedding file not found (set embedding.file)", file=path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as d:
            for key in ("item_id", "embedding"):
                if key not in d.files:
                    raise DataPrepError(f"missing array {key!r} (has {d.files})", file=path, column=key)
            ids, vecs = d["item_id"].astype(str).astype(object), np.asarray(d["embedding"], dtype=np.float32)
    else:
        df = pd.read_parquet(path)
        for key in ("item_id", "embedding"):
            if key not in df.columns:
                raise DataPrepError(f"missing column (has {list(df.columns)})", file=path, column=key)
        ids = df["item_id"].astype(str).to_numpy(dtype=object)
        lens = df["embedding"].map(len).to_numpy()
        if len(set(lens.tolist())) > 1:
            r = int(np.flatnonzero(lens != lens[0])[0]) + 1
            raise DataPrepError(f"embedding length {lens[r - 1]} differs from the first row's {lens[0]}",
                                file=path, column="embedding", row=r)
        vecs = np.stack(df["embedding"].to_numpy()).astype(np.float32)
    if vecs.ndim != 2 or len(ids) != len(vecs):
        raise DataPrepError("embedding must be a 2-D array with one row per item_id", file=path, column="embedding")
    bad = ~np.isfinite(vecs).all(axis=1)
    if bad.any():
        raise DataPrepError("non-finite embedding value", file=path, column="embedding", row=int(np.flatnonzero(bad)[0]) + 1)
    dup = pd.Series(ids).duplicated().to_numpy()
    if dup.any():
        raise DataPrepError(f"duplicate item id {ids[dup][0]!r}", file=path, column="item_id",
                            row=int(np.flatnonzero(dup)[0]) + 1)
    return ids, vecs


def build_item_embeddings(cfg: Mapping, train: TrainCodes | CollabFactors, all_items: np.ndarray,
                          items: pd.DataFrame | None, seed: int) -> ItemEmbeddings:
    """Embeddings for warm items (seen in ``train``) and, where the method allows, cold items.

    ``all_items`` is every item id of the log (sorted); ``train`` holds only pre-cutoff events, or
    is their :class:`CollabFactors` computed elsewhere (``engine=ray``).
    """
    method = cfg.get("method", "collab")
    dim = int(cfg.get("dim", 32))
    warm_ids = np.asarray(train.items, dtype=object)
    warm_set = set(warm_ids.tolist())
    stats: dict = {"method": method}
    meta = None
    if items is not None:
        meta = items.set_index("item_id").reindex(all_items)
        present = meta.index.isin(items["item_id"])
        meta = meta[present].reset_index()
        for col in ("title", "description", "category"):
            if col in meta.columns:
                meta[col] = meta[col].fillna("")

    if method == "collab":
        if isinstance(train, CollabFactors):
            ids, vecs, s = train.items, train.vectors, dict(train.stats)
        else:
            ids, vecs, s = collaborative(train, dim, float(cfg.get("like_weight", 1.0)),
                                         float(cfg.get("dislike_weight", 1.0)), seed, svd_solver(cfg, False),
                                         int(cfg.get("svd_iters", 5)))
        stats.update(s)
        source = np.full(len(ids), "collab", dtype=object)
        if cfg.get("cold_from_content", True) and has_content(meta):
            from sklearn.linear_model import Ridge

            warm_mask = meta["item_id"].isin(warm_set).to_numpy()
            cold_mask = ~warm_mask
            if cold_mask.any() and warm_mask.sum() >= 2:
                X = content_matrix(meta, warm_mask)
                target = pd.DataFrame(vecs, index=ids).reindex(meta["item_id"][warm_mask]).to_numpy()
                reg = Ridge(alpha=float(cfg.get("cold_ridge_alpha", 1.0))).fit(X[warm_mask], target)
                cold_vecs = reg.predict(X[cold_mask]).astype(np.float32)
                ids = np.concatenate([ids, meta["item_id"][cold_mask].to_numpy(dtype=object)])
                vecs = np.concatenate([vecs, cold_vecs])
                source = np.concatenate([source, np.full(int(cold_mask.sum()), "content", dtype=object)])
                stats["cold_from_content"] = int(cold_mask.sum())
    elif method in ("content", "hf"):
        if not has_content(meta):
            raise DataPrepError(f"embedding.method={method} needs item metadata with text/category (input.items)")
        fit_mask = meta["item_id"].isin(warm_set).to_numpy()
        if fit_mask.sum() < 2:
            raise DataPrepError("too few warm items with metadata to fit content features")
        if method == "content":
            vecs = content_embeddings(meta, fit_mask, dim, seed)
        else:
            text = meta.get("title", pd.Series([""] * len(meta))).astype(str)
            if "description" in meta.columns:
                text = text + ". " + meta["description"].astype(str)
            vecs = hf_embeddings(text.tolist(), cfg.get("hf_model_path"), int(cfg.get("hf_batch_size", 64)))
        ids = meta["item_id"].to_numpy(dtype=object)
        source = np.full(len(ids), "content", dtype=object)
    elif method == "file":
        fids, fvecs = file_embeddings(cfg.get("file"))
        known = pd.Series(fids).isin(set(all_items.tolist())).to_numpy()
        ids, vecs = fids[known], fvecs[known]
        source = np.full(len(ids), "file", dtype=object)
        stats["file_rows_not_in_log"] = int((~known).sum())
        missing = len(warm_set - set(ids.tolist()))
        stats["warm_items_without_file_embedding"] = missing
    else:
        raise DataPrepError(f"embedding.method must be collab, content, hf or file, got {method!r}")

    if cfg.get("normalize", True):
        vecs = _l2(vecs)
    order = np.argsort(ids.astype(str), kind="stable")
    ids, vecs, source = ids[order], np.ascontiguousarray(vecs[order], dtype=np.float32), source[order]
    stats.update(n_embedded=int(len(ids)), dim=int(vecs.shape[1]),
                 n_warm_embedded=int(pd.Series(ids).isin(warm_set).sum()))
    return ItemEmbeddings(ids, vecs, source, stats)
