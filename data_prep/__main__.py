"""``python -m conrec_verl.data_prep --config-name kuairand out_dir=<folder> [key=value ...]``"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from conrec_verl.data_prep.errors import DataPrepError


@hydra.main(config_path="config", config_name="kuairand", version_base=None)
def main(cfg: DictConfig) -> None:
    import signal

    from conrec_verl.data_prep.pipeline import build

    # kill (SIGTERM) unwinds like Ctrl-C: the temporary build folder is removed, out_dir untouched
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    try:
        build(cfg)
    except DataPrepError as exc:
        print(f"data_prep: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # e.g. a read-only or full output folder: one line, not a traceback
        print(f"data_prep: error: cannot write or read {exc.filename or cfg.get('out_dir')}: {exc.strerror or exc}",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
