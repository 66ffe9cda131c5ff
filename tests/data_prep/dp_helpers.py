"""Small synthetic logs and configs for the data_prep tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from conrec_verl.data_prep import load_config

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


GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance"]


def write_movielens(folder: Path, seed=0, n_users=30, n_items=50, per_user=25):
    """u.data / u.item in the GroupLens 100K formats; items 40..49 are only rated late (cold)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    lines = []
    t0 = 880_000_000
    for u in range(1, n_users + 1):
        ts = t0 + np.sort(rng.integers(0, 60 * 86400, per_user))
        for k, t in enumerate(ts):
            late = k >= int(0.8 * per_user)
            item = int(rng.integers(40, n_items)) if late else int(min(rng.geometric(0.08), 40))
            lines.append(f"{u}\t{item}\t{int(rng.integers(1, 6))}\t{int(t)}")
    (folder / "u.data").write_text("\n".join(lines) + "\n")
    items = []
    for i in range(1, n_items + 1):
        flags = ["0"] * 19
        flags[1 + i % 5] = "1"
        items.append("|".join([str(i), f"{GENRES[i % 5]} movie {i} ({1990 + i % 7})", "01-Jan-1995", "", "http://x"] + flags))
    (folder / "u.item").write_text("\n".join(items) + "\n", encoding="latin-1")
