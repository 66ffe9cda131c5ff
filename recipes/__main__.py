"""``python -m conrec_verl.recipes [config|pipeline|scripts]``: where the shipped recipes are."""

from __future__ import annotations

import argparse

from conrec_verl.recipes import CONFIG_PKG, config_dir, profile_dir, recipe_dir


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m conrec_verl.recipes", description=__doc__.split(":")[1].strip())
    ap.add_argument("what", nargs="?", choices=["config", "pipeline", "scripts"],
                    help="print only this folder (e.g. --config-path \"$(python -m conrec_verl.recipes config)\")")
    args = ap.parse_args(argv)
    paths = {"config": config_dir(), "pipeline": profile_dir(), "scripts": recipe_dir()}
    if args.what:
        print(paths[args.what])
        return
    for name, path in paths.items():
        print(f"{name:9s}{path}")
    print(f"{'hydra':9s}--config-path {CONFIG_PKG}")


if __name__ == "__main__":
    main()
