"""Small synthetic logs and configs for the data_prep tests."""

from __future__ import annotations

import numpy as np
import pandas as pd

from data_prep import load_config

START = pd.Timestamp("2024-01-01")


def synth_log(seed: int = 0, n_users: int = 40, n_items: int = 60, n_days: int = 20, per_day: int = 3) -> pd.DataFrame:
    """Every user has a few events per day; item popularity is skewed so Swing has co-dislikes."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for d in range(n_days):
            for _ in range(rng.integers(1, per_day + 1)):
                item = int(min(rng.geometric(0.06), n_items)) - 1
                ts = START + pd.Timedelta(days=d, seconds=int(rng.integers(0, 86400)))
                label = int(rng.random() < 0.65)
                rows.append((f"u{u}", f"i{item}", int(ts.value // 10**6), label))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "label"])


def ms(day: int, hour: int = 12) -> int:
    """Epoch ms of 2024-01-(day) at ``hour`` UTC."""
    return int((START + pd.Timedelta(days=day - 1, hours=hour)).value // 10**6)


def generic_cfg(log_path, out_dir, *extra: str):
    return load_config("generic", [
        f"input.path={log_path}", f"out_dir={out_dir}", "split.eval_cutoff_day=20240110",
        "sid.sizes=[4,4,8]", "embedding.dim=8", "progress=false", "print_summary=false",
        "split.num_train_cutoffs=3", *extra])
