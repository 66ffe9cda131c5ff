"""The training events as integer codes: what the item embeddings and Swing read (pure; numpy/pandas).

Both item-side steps that need every training event, the SVD of the signed user x item matrix
(``embedding.method=collab``) and Swing on the dislike graph, read only who (user), what (item),
how (polarity, weight) and, for Swing's per-item cap, when (the time of a dislike). :class:`TrainCodes`
holds exactly that, as arrays: a user and an item code (positions in the sorted user and item
ids) per event, in the log's order (user, time, item, file order). That is about 13 bytes per event,
plus 8 per dislike (about 15 per event with the id arrays, where a table of the events with their
string ids takes about 145). The local engine builds it from its table; ``engine=ray`` with a log
read on the cluster never gathers the events: the SVD runs on the user partitions
(``data_prep/partitioned_svd.py``) and Swing on a graph partitioned by item (``data_prep/swing_ray.py``).

Codes follow the sorted ids (``pd.factorize(..., sort=True)``), so any order or tie-break taken on
codes is the one taken on the ids, and the steps' outputs equal those computed from the table.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import pandas as pd


@dataclass
class TrainCodes:
    """The training events of a log as codes (one entry per event, in the log's order).

    ``users`` / ``items``: the distinct ids, sorted (object arrays); ``user`` / ``item``: int32
    positions in them; ``polarity``: int8 (> 0 like, < 0 dislike); ``weight``: the event weight (as
    the table had it); ``neg_ts``: the time of every dislike (``polarity < 0``), in event order.
    """

    users: np.ndarray
    items: np.ndarray
    user: np.ndarray
    item: np.ndarray
    polarity: np.ndarray
    weight: np.ndarray
    neg_ts: np.ndarray

    def __len__(self) -> int:
        return len(self.user)

    @property
    def nbytes(self) -> int:
        """Bytes of the per-event arrays (the id arrays are per user / per item)."""
        return sum(a.nbytes for a in (self.user, self.item, self.polarity, self.weight, self.neg_ts))

    @property
    def dislike(self) -> np.ndarray:
        """Mask of the dislikes."""
        return self.polarity < 0

    @classmethod
    def from_frame(cls, train: pd.DataFrame) -> "TrainCodes":
        """From a table of events (``user_id``, ``item_id``, ``ts``, ``polarity``, ``weight``) in
        the log's order."""
        u, users = pd.factorize(train["user_id"], sort=True)
        i, items = pd.factorize(train["item_id"], sort=True)
        _check_code_range(len(users), len(items))
        polarity = train["polarity"].to_numpy().astype(np.int8, copy=False)
        return cls(np.asarray(users, dtype=object), np.asarray(items, dtype=object), u.astype(np.int32),
                   i.astype(np.int32), polarity, train["weight"].to_numpy(),
                   train["ts"].to_numpy(dtype=np.int64)[polarity < 0])


def _check_code_range(n_users: int, n_items: int) -> None:
    limit = np.iinfo(np.int32).max
    if max(n_users, n_items) > limit:
        raise ValueError(f"TrainCodes: {n_users} users and {n_items} items; int32 codes hold at most {limit}")
