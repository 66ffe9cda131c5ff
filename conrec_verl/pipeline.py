"""The whole CoNRec pipeline in one command, resumable:

    data_prep -> model -> SFT (translation, alignment, warm-up) -> progressive GRPO -> evaluation

``python -m conrec_verl.pipeline --run-dir runs/kuairand`` (or ``conrec-pipeline``) runs it on the
bundled KuaiRand sample with the ``cpu_tiny`` profile. Every phase is a stock tool: ``python -m
data_prep``, ``conrec-model``, ``torchrun -m verl.trainer.sft_trainer`` (verl's own SFT trainer),
``python -m verl.trainer.main_ppo`` (with the conrec plugins) and ``conrec-eval``. Everything goes
under one run folder::

    RUN/pipeline.json        resolved profile + finished phases (what a rerun skips)
    RUN/logs/<phase>.log     each phase's full output
    RUN/data/                data_prep output
    RUN/models/base          the starting model (tiny, or a user model extended with SID tokens)
    RUN/sft/<stage>/         verl SFT checkpoints; RUN/models/sft_<stage> its Hugging Face export
    RUN/grpo/                main_ppo checkpoints; RUN/models/grpo its Hugging Face export
    RUN/grpo_cleaning/       cross-stage cleaning decisions (grpo.cleaning.enabled), one per stage;
                             RUN/models/grpo_stage<k> the model that screened stage k+1
    RUN/eval/                report.md, metrics.json, plots

Killing the command and running it again continues after the last finished phase; inside SFT
and GRPO, verl's own ``resume_mode=auto`` continues from the last checkpoint (GRPO in the right
curriculum stage: the stage follows the global step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml
from omegaconf import OmegaConf

from conrec_verl.core.metrics import HIT_METRIC_RE as METRIC_RE
from conrec_verl.io_utils import atomic_dir, atomic_write_text

from conrec_verl.recipes import profile_dir, recipe_dir

# shipped inside the package (importlib.resources), so a wheel install outside any checkout works
RECIPE_DIR = recipe_dir()
PROFILE_DIR = profile_dir()


class PipelineError(RuntimeError):
    """A phase failed or the inputs are inconsistent; the message says what to fix."""


STOP_GRACE_S = 30.0


def stop_child(proc: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM a child still running, SIGKILL it after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    import signal

    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second kill must not cut this short
    try:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Terminated(KeyboardInterrupt):
    """SIGTERM reached the pipeline (handled like Ctrl-C: children stopped, state kept)."""


def _raise_terminated(signum, frame):  # noqa: ARG001 - signal handler signature
    raise _Terminated(f"signal {signum}")


class RunLock:
    """An exclusive lock on a run folder (``RUN/.lock``): one pipeline per folder. The OS releases
    it when the holder exits, however it exits, so a lock is never stale; the file names the
    holder (pid, host, start time) for the message a second pipeline gets."""

    def __init__(self, run: Path):
        self.path = run / ".lock"
        self._fh = None

    def __enter__(self) -> "RunLock":
        import fcntl
        import socket

        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise PipelineError(f"{self.path.parent} is in use by another pipeline ({holder}); wait for it or use "
                                "another --run-dir") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._fh = fh
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self._fh.close()  # releases the lock
            self._fh = None


@dataclass
class Phase:
    name: str
    title: str


def load_profile(name_or_path: str, overrides: Sequence[str] = ()):
    """A pipeline profile (a name in ``recipes/conrec/pipeline/`` or a yaml path) with ``key=value``
    overrides. An override of a key the profile does not have, or one that is not valid YAML, is
    one :class:`PipelineError` (a typo would otherwise be ignored)."""
    from omegaconf.errors import OmegaConfBaseException

    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise PipelineError(f"pipeline profile {name_or_path!r} not found (known: {known})")
    cfg = OmegaConf.load(path)
    if "defaults_from" in cfg:
        base = load_profile(str(cfg.defaults_from))
        cfg = OmegaConf.merge(base, {k: v for k, v in cfg.items() if k != "defaults_from"})
    if overrides:
        for item in overrides:
            item = str(item)
            eq = item.find("=")
            if eq > 0 and item[eq - 1] == "+":  # key+=[...]: append to the profile's list
                key = item[: eq - 1]
                current = OmegaConf.select(cfg, key)
                if not OmegaConf.is_list(current):
                    raise PipelineError(f"profile override {item!r}: '+=' appends to a list, and {key} is "
                                        f"{'not a key of the profile' if current is None else 'not a list'}")
                try:
                    extra = yaml.safe_load(item[eq + 1:])
                except yaml.YAMLError as exc:
                    raise PipelineError(f"profile override {item!r}: not a valid YAML list ({exc})") from None
                extra = extra if isinstance(extra, list) else [extra]
                OmegaConf.update(cfg, key, [*OmegaConf.to_container(current), *extra], merge=False)
                continue
            try:
                patch = OmegaConf.from_dotlist([str(item)])
            except (OmegaConfBaseException, ValueError, yaml.YAMLError) as exc:
                raise PipelineError(f"profile override {item!r} is not key=value with a valid YAML value "
                                    f"(quote nested lists, e.g. 'grpo.overrides=[a=1,b=2]'): "
                                    f"{str(exc).splitlines()[0]}") from None
            OmegaConf.set_struct(cfg, True)
            try:
                cfg = OmegaConf.merge(cfg, patch)
            except OmegaConfBaseException as exc:
                raise PipelineError(f"profile override {item!r}: {str(exc).splitlines()[0]} (the profile's keys: "
                                    f"conrec-pipeline --help)") from None
            finally:
                OmegaConf.set_struct(cfg, False)
    return cfg


def profile_keys(profile=None) -> list[str]:
    """The dotted keys of a profile (for ``--help``)."""
    profile = load_profile("cpu_tiny") if profile is None else profile
    out = []

    def walk(node, prefix):
        for key, value in node.items():
            if OmegaConf.is_dict(value):
                walk(value, f"{prefix}{key}.")
            else:
                out.append(f"{prefix}{key}")

    walk(profile, "")
    return out


def _diff_keys(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain containers."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


PATH_KEYS = ("model.base", "data.input_path")

#: profile keys added after run folders were first recorded, with the value that does what a
#: profile without them did: a recorded profile that lacks one is read with it (so that a run
#: folder of an older version still resumes), and only another value counts as a change
ADDED_KEYS = {"model.tiny.sid_init": "random"}


def with_added_keys(profile: dict) -> dict:
    """``profile`` (a plain container, as recorded in ``pipeline.json``) with every :data:`ADDED_KEYS`
    key it lacks set to its default; keys under a missing parent (e.g. no ``model.tiny``) stay absent."""
    out = json.loads(json.dumps(profile))
    for dotted, value in ADDED_KEYS.items():
        *parents, leaf = dotted.split(".")
        node = out
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf not in node:
            node[leaf] = value
    return out


def resolve_paths(profile):
    """The profile with its path keys absolute (relative to the caller's folder, where the user
    typed them; the phases run in the run folder)."""
    profile = OmegaConf.create(OmegaConf.to_container(profile, resolve=False))
    for key in PATH_KEYS:
        value = OmegaConf.select(profile, key)
        if value and not os.path.isabs(os.path.expanduser(str(value))):
            OmegaConf.update(profile, key, os.path.abspath(os.path.expanduser(str(value))))
    return profile


def _env(profile) -> dict[str, str]:
    env = dict(os.environ)
    if profile.device == "cpu":
        from conrec_verl.runtime.cpu_env import cpu_env  # torch-free: the launcher stays small

        env.update(cpu_env())
    else:  # one node: the unauthenticated sockets on loopback (docs/security.md)
        from conrec_verl.runtime.cpu_env import loopback_env

        env.update(loopback_env())
    env.setdefault("WANDB_MODE", "disabled")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Pipeline:
    def __init__(self, run_dir: Path, profile, echo=print, allow_profile_change: bool = False):
        self.run = Path(run_dir).resolve()
        self.profile = resolve_paths(profile)
        self.allow_profile_change = allow_profile_change
        self.echo = echo
        self.state_path = self.run / "pipeline.json"
        self.env = _env(profile)

    # -- state -----------------------------------------------------------------------------
    def _load_state(self) -> dict:
        if self.state_path.is_file():
            return json.loads(self.state_path.read_text())
        return {"done": {}, "profile": OmegaConf.to_container(self.profile, resolve=True)}

    def check_profile(self, state: dict) -> None:
        """A run folder keeps the profile it was started with (``pipeline.json``): a resumed run with
        other settings would mix two configurations in one folder. ``allow_profile_change`` records
        the new profile (the old ones stay in ``profile_history``)."""
        current = json.loads(json.dumps(OmegaConf.to_container(self.profile, resolve=True)))
        recorded = state.get("profile")
        if recorded is None or not state["done"]:
            state["profile"] = current
            return
        recorded = with_added_keys(recorded)
        if json.dumps(recorded, sort_keys=True) == json.dumps(current, sort_keys=True):
            return
        changed = sorted(_diff_keys(recorded, current))
        if not self.allow_profile_change:
            raise PipelineError(f"{self.run} was run with another profile (changed: {', '.join(changed[:8])}); use a "
                                "new --run-dir (or --from this one), or pass --allow-profile-change to continue "
                                "here with the new settings")
        state.setdefault("profile_history", []).append(recorded)
        state["profile"] = current
        self.echo(f"[conrec-pipeline] profile changed ({', '.join(changed[:8])}); recorded in pipeline.json")

    def _save_state(self, state: dict) -> None:
        atomic_write_text(self.state_path, json.dumps(state, indent=2))

    def _run(self, phase: str, cmd: list[str], cwd: Path | None = None) -> None:
        """Run one phase command, its output appended to ``logs/<phase>.log``. The pipeline owns the
        child: if the pipeline is interrupted (Ctrl-C, ``kill``), the child gets SIGTERM (torchrun
        and main_ppo stop their workers on it), then SIGKILL after ``STOP_GRACE_S``."""
        log = self.run / "logs" / f"{phase}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as fh:
            fh.write(f"\n$ {' '.join(cmd)}\n")
            fh.flush()
            proc = subprocess.Popen(cmd, cwd=str(cwd or self.run), env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
            try:
                returncode = proc.wait()
            except BaseException:
                stop_child(proc)
                raise
        if returncode != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
            raise PipelineError(f"phase {phase} failed (exit {returncode}); last lines of {log}:\n{tail}")

    # -- checks before any training ----------------------------------------------------------
    def check_inputs(self) -> None:
        base = self.profile.model.base
        if base and not Path(os.path.expanduser(str(base))).exists():
            raise PipelineError(f"model.base={base} does not exist")
        data_path = self.profile.data.get("input_path")
        if data_path and not Path(os.path.expanduser(str(data_path))).exists():
            raise PipelineError(f"data.input_path={data_path} does not exist")
        from conrec_verl.model_builder import SID_INITS

        sid_init = self.profile.model.get("tiny", {}).get("sid_init", "random")
        if sid_init not in SID_INITS:
            raise PipelineError(f"model.tiny.sid_init={sid_init}: choose {' or '.join(SID_INITS)}")
        if base and sid_init != "random":
            raise PipelineError(f"model.tiny.sid_init={sid_init} applies to the tiny model only; with model.base "
                                "the SID rows of the extended model start at the mean of its embeddings")
        self._cleaning_rule()  # a bad grpo.cleaning block fails here, before any work
        self._grpo_selection()

    def check_data_folder(self, state: dict) -> str:
        """The data folder is one SID build: manifest, codebook and RL rows agree."""
        from conrec_verl.core.sid import Codebook

        data = self.run / "data"
        manifest = json.loads((data / "manifest.json").read_text())
        book = Codebook.load(data / "codebook.npz")
        if manifest.get("sid_build") != book.fingerprint:
            raise PipelineError(f"{data}: manifest sid_build {manifest.get('sid_build')} does not match the codebook "
                                f"({book.fingerprint}); rebuild the data folder")
        recorded = state.get("sid_build")
        if recorded and recorded != book.fingerprint:
            raise PipelineError(
                f"{data} is SID build {book.fingerprint}, but this run's models were trained on build {recorded}: "
                "use a new --run-dir (or delete the run folder) after rebuilding the data")
        return book.fingerprint

    # -- phases --------------------------------------------------------------------------------
    def phases(self) -> list[Phase]:
        out = [Phase("data", "data_prep"), Phase("model", "base model with SID tokens")]
        for stage in self.profile.sft.stages:
            out.append(Phase(f"sft_{stage.name}", f"SFT {stage.name}"))
        out += [Phase("grpo", "progressive GRPO"), Phase("eval", "evaluation")]
        return out

    def select(self, only: Sequence[str], state: dict) -> list[Phase]:
        """The phases to run: all, or those named in ``only`` (each must be a phase of this profile,
        and the data and model phases must be done or selected before any later phase)."""
        phases = self.phases()
        names = [p.name for p in phases]
        unknown = [n for n in only if n not in names]
        if unknown:
            raise PipelineError(f"--only: unknown phase(s) {unknown}; this profile's phases: {', '.join(names)}")
        chosen = [p for p in phases if not only or p.name in only]
        for need in ("data", "model"):
            later = [p.name for p in chosen if names.index(p.name) > names.index(need)]
            if later and need not in state["done"] and need not in [p.name for p in chosen]:
                raise PipelineError(f"phase {later[0]} needs the {need} phase first: it has not run in {self.run}; "
                                    f"add it to --only (e.g. --only {need},{','.join(later)}) or run without --only")
        return chosen

    def run_all(self, only: Sequence[str] = (), start_from: Path | None = None,
                reuse: Sequence[str] | None = None) -> Path:
        if self.run.exists() and not self.run.is_dir():
            raise PipelineError(f"--run-dir {self.run} is a file, not a folder")
        self.run.mkdir(parents=True, exist_ok=True)
        self.check_inputs()
        with RunLock(self.run):
            if start_from is not None:
                self.start_from(Path(start_from), reuse)
            return self._run_locked(only)

    def start_from(self, source: Path, reuse: Sequence[str] | None = None) -> list[str]:
        """Begin this run folder with another run folder's finished phases (``--from``): its data
        folder (linked, not copied) and the phases in ``reuse`` (default: every finished phase before
        GRPO), whose models this run then starts from -- e.g. new GRPO settings on the same SFT.
        Each reused model is linked as ``RUN/models/<name>``."""
        source = Path(source).resolve()
        src_state_path = source / "pipeline.json"
        if not src_state_path.is_file():
            raise PipelineError(f"--from {source}: not a run folder (no pipeline.json)")
        src = json.loads(src_state_path.read_text())
        names = [p.name for p in self.phases()]
        recorded = self._load_state().get("from") or {}
        if reuse is None and recorded.get("run") == str(source):
            reuse = list(recorded.get("phases") or [])  # a rerun reuses what the first run chose
        if reuse is None:
            reuse = [n for n in names[: names.index("grpo")] if n in src["done"]]
        unknown = [n for n in reuse if n not in names]
        if unknown:
            raise PipelineError(f"--reuse: unknown phase(s) {unknown}; this profile's phases: {', '.join(names)}")
        missing = [n for n in reuse if n not in src["done"]]
        if missing:
            raise PipelineError(f"--reuse: phase(s) {missing} have not finished in {source}")
        if "data" not in reuse:
            raise PipelineError("--reuse must include the data phase: reused models were trained on that SID build")
        state = self._load_state()
        if state["done"] and any(state["done"].get(n) != dict(src["done"][n], reused_from=str(source))
                                 for n in reuse if n in state["done"]):
            raise PipelineError(f"{self.run} already has finished phases of its own; --from starts a new run folder")
        link = self.run / "data"
        if link.exists() and link.resolve() != (source / "data").resolve():
            raise PipelineError(f"{link} exists and is not {source / 'data'}")
        # RUN/models/<x> of a reused phase links to the source's model, so that this run folder holds
        # every model it was made from where a user (or run_ablation.sh) looks for it; all checked
        # before anything is linked
        models = {}
        for n in reuse:
            model = src["done"][n].get("path")
            if model and Path(model).is_dir():
                dest = self.run / "models" / Path(model).name
                if (dest.exists() or dest.is_symlink()) and dest.resolve() != Path(model).resolve():
                    raise PipelineError(f"{dest} exists and is not {model}, the {n} model this run reuses; "
                                        "move it away or start a new run folder")
                models[dest] = Path(model).resolve()
        if not link.exists():
            link.symlink_to(source / "data", target_is_directory=True)
        for dest, model in models.items():
            if not (dest.exists() or dest.is_symlink()):
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.symlink_to(model, target_is_directory=True)
        for n in reuse:
            state["done"][n] = dict(src["done"][n], reused_from=str(source))
        state["sid_build"] = src.get("sid_build")
        state["from"] = {"run": str(source), "phases": list(reuse)}
        self._save_state(state)
        self.echo(f"[conrec-pipeline] starting from {source}: reusing {', '.join(reuse)}")
        return list(reuse)

    def _run_locked(self, only: Sequence[str]) -> Path:
        state = self._load_state()
        self.check_profile(state)
        phases = self.select(only, state)
        todo = [p for p in phases if p.name not in state["done"]]
        if todo:
            self.check_configs(todo, state)
        start_all = time.time()
        for i, phase in enumerate(phases, 1):
            prefix = f"[conrec-pipeline] ({i}/{len(phases)}) {phase.title}"
            if phase.name in state["done"]:
                self.echo(f"{prefix}: done earlier, skipped")
                continue
            self.echo(f"{prefix} ...", )
            t0 = time.time()
            info = getattr(self, f"phase_{phase.name.split('_')[0]}")(phase, state) or {}
            state["done"][phase.name] = {"seconds": round(time.time() - t0, 1), **info}
            self._save_state(state)
            self.echo(f"{prefix}: done in {time.time() - t0:.0f} s")
        self.echo(f"[conrec-pipeline] all phases done in {time.time() - start_all:.0f} s; run folder: {self.run}")
        return self.run

    # -- the verl configs of the training phases -----------------------------------------------
    def _sft_overrides(self, stage, model, train, ckpt) -> list[str]:
        val = []
        if stage.get("select_by_val"):  # validation loss after every epoch; a checkpoint per epoch
            val = [f"data.val_files={self.run / 'data' / str(stage.select_by_val)}",
                   "trainer.test_freq=after_each_epoch", "trainer.save_freq=after_each_epoch"]
        return [f"model.path={model}", f"data.train_files={train}", f"trainer.default_local_dir={ckpt}",
                f"trainer.experiment_name=sft_{stage.name}", *val, *map(str, self.profile.sft.overrides),
                *map(str, stage.get("overrides", []))]

    @staticmethod
    def metric_by_step(log: Path, key: str) -> dict[int, float]:
        """``{step: value}`` of metric ``key`` in a phase's log (verl's console logger prints
        ``step:N - key:value - ...``; the last value of a step wins when a resumed run logged it again)."""
        import re

        out: dict[int, float] = {}
        if not log.is_file():
            return out
        # a numpy scalar prints as np.float64(0.5) (verl formats values with pprint)
        number = r"(?:np\.\w+\()?([-+]?(?:inf|nan)|[-+0-9.eE]+)\)?"
        pattern = re.compile(r"step:(\d+) - (?:.*? - )?" + re.escape(key) + ":" + number + r"(?: |$)")
        for line in log.read_text(errors="replace").splitlines():
            m = pattern.search(line)
            if m:
                out[int(m.group(1))] = float(m.group(2))
        return out

    def choose_step(self, log: Path, key: str, mode: str, ckpt: Path, sub: str, what: str) -> tuple[int, dict]:
        """The checkpoint step whose ``key`` in ``log`` is best (``mode`` ``min`` or ``max``; ties to the
        earlier step) among the steps with a Hugging Face export ``ckpt/global_step_<s>/<sub>``, and
        ``{step: value}`` of those; steps without an export or with a non-finite value are passed over."""
        logged = self.metric_by_step(log, key)
        values = {s: v for s, v in logged.items()
                  if math.isfinite(v) and (ckpt / f"global_step_{s}" / sub / "config.json").is_file()}
        if not values:
            raise PipelineError(f"{what}: no finite {key} logged at a checkpoint in {log} (logged at steps "
                                f"{sorted(logged) or 'none'})")
        best = (min if mode == "min" else max)(values.values())
        step = min(s for s, v in values.items() if v == best)
        return step, {str(s): round(v, 5) for s, v in sorted(values.items())}

    def _grpo_overrides(self, model, data, ckpt) -> list[str]:
        # grpo.select_by_val: verl validates at every checkpoint (test_freq follows save_freq)
        selection = self._grpo_selection()
        verl_metric = selection is not None and not METRIC_RE.match(selection[0])
        val = ["trainer.test_freq=${trainer.save_freq}"] if verl_metric else []
        return [f"data_dir={data}", f"actor_rollout_ref.model.path={model}", f"trainer.default_local_dir={ckpt}",
                *val, *self._own_ray(), *map(str, self.profile.grpo.overrides)]

    def _own_ray(self) -> list[str]:
        """main_ppo starts a Ray of its own for the run unless the user points it at a cluster
        (:func:`conrec_verl.runtime.own_ray.own_ray_overrides`)."""
        from conrec_verl.runtime.own_ray import own_ray_overrides

        return own_ray_overrides(self.profile.grpo.overrides, self.env)

    def _grpo_selection(self) -> tuple[str, str, bool] | None:
        """``(metric, mode, include_start)`` of the profile's ``grpo.select_by_val``, or None when it is
        off. ``metric`` is a key verl logs at validation, or ``FHR@K`` / ``HR@K``: the evaluation's
        metric on the validation users' rows (:mod:`conrec_verl.evaluation.select`), where
        ``include_start`` also scores the model GRPO started from (step 0)."""
        block = self.profile.grpo.get("select_by_val")
        if not block:
            return None
        if not hasattr(block, "keys") or set(block.keys()) - {"metric", "mode", "include_start"}:
            raise PipelineError(f"grpo.select_by_val must be null or {{metric: <key verl logs, or FHR@K>, mode: "
                                f"max|min, include_start: true|false}}, got {block!r}")
        metric, mode = block.get("metric"), block.get("mode", "max")
        include_start = block.get("include_start", False)
        if not metric or not isinstance(metric, str):
            raise PipelineError("grpo.select_by_val.metric must name a validation metric verl logs, e.g. "
                                "val-aux/conrec/reward/mean@1, or FHR@K / HR@K (beam search on rl/val.parquet)")
        if mode not in ("max", "min"):
            raise PipelineError(f"grpo.select_by_val.mode must be max or min, got {mode!r}")
        if not isinstance(include_start, bool):
            raise PipelineError(f"grpo.select_by_val.include_start must be true or false, got {include_start!r}")
        if METRIC_RE.match(metric):
            if mode != "max":
                raise PipelineError(f"grpo.select_by_val: {metric} is a hit rate, its mode must be max")
            self._selection_args()  # the prompt settings the selection will use, checked up front
        elif include_start:
            raise PipelineError("grpo.select_by_val.include_start needs metric FHR@K or HR@K (verl does not "
                                "validate the starting model at a checkpoint)")
        return metric, mode, include_start

    def _eval_flag(self, name: str, default: str) -> str:
        """The value of ``name`` in the profile's ``eval.args`` (``--flag value`` or ``--flag=value``)."""
        args = [str(a) for a in self.profile.eval.get("args") or []]
        for i, a in enumerate(args):
            if a == name and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(name + "="):
                return a.split("=", 1)[1]
        return default

    def _eval_prompt(self, key: str) -> tuple[str, str]:
        """(context, budget) a model row is evaluated with: ``eval.<key>`` (``warmup_prompt`` /
        ``grpo_prompt``, ``CONTEXT[,BUDGET]``), else ``--prompt-context`` / ``--max-prompt-tokens``
        of ``eval.args``, else 3 and 384 (the evaluation's defaults)."""
        context, budget = self._eval_flag("--prompt-context", "3"), self._eval_flag("--max-prompt-tokens", "384")
        if self.profile.eval.get(key):
            first, _, second = str(self.profile.eval[key]).partition(",")
            context, budget = first.strip() or context, second.strip() or budget
        return context, budget

    def _data_prep_request(self) -> tuple[str, list[str], Path] | None:
        """A :meth:`compose_configs` request for this run's data_prep config (data_prep's config
        folder, the profile's ``data`` overrides), or None once the data folder's manifest records it."""
        if (self.run / "data" / "manifest.json").is_file():
            return None
        import importlib.util

        config_dir = Path(importlib.util.find_spec("conrec_verl.data_prep").submodule_search_locations[0]) / "config"
        overrides = [f"out_dir={self.run / 'data'}", *map(str, self.profile.data.overrides)]
        if self.profile.data.get("input_path"):
            overrides.append(f"input.path={self.profile.data.input_path}")
        return str(self.profile.data.config), overrides, config_dir

    def check_contexts(self, grpo: dict | None, data: dict | None) -> None:
        """Every prompt context a model is RL-trained (the progressive-GRPO stages, verl's
        validation rows) or evaluated with (the warm-up and GRPO rows, GRPO checkpoint selection)
        is one warm-up SFT taught it (``sft.warmup.contexts`` of data_prep): a model asked in a
        form it never learned answers as it was taught elsewhere. Checked before the first phase
        when the profile has a warm-up stage; a :class:`PipelineError` names each asker."""
        from conrec_verl.core.schedule import ScheduleError, StageSchedule, untaught_contexts

        if not any(str(s.name) == "warmup" for s in self.profile.sft.stages):
            return
        if data is None:  # the data folder is built: its manifest records the config it was built with
            data = json.loads((self.run / "data" / "manifest.json").read_text()).get("config") or {}
        taught = ((data.get("sft") or {}).get("warmup") or {}).get("contexts") or []
        if not taught:  # a data folder whose manifest predates the key: nothing to check against
            return
        rl = data.get("rl") or {}

        def rl_context(new: str, old: str):  # an old key name wins over the new one's default (rl_options)
            return rl.get(old) if rl.get(old) is not None else rl.get(new)

        asked: dict[str, int | None] = {}
        if grpo is not None:
            algo = grpo.get("algorithm") or {}
            if algo.get("adv_estimator") == "progressive_grpo":
                try:
                    schedule = StageSchedule.from_config(algo.get("progressive_grpo"))
                except ScheduleError as exc:
                    raise PipelineError(f"grpo: {exc}") from None
                asked.update({f"GRPO stage {s.name}": s.context for s in schedule.stages})
            asked["GRPO validation rows (rl.val_context)"] = rl_context("val_context", "val_stage")
        row = rl_context("eval_context", "eval_stage")
        for key, who in (("warmup_prompt", "the warm-up SFT row"), ("grpo_prompt", "the GRPO row")):
            if key == "grpo_prompt" and grpo is None and "grpo" not in {p.name for p in self.phases()}:
                continue
            context = self._eval_prompt(key)[0]
            asked[f"evaluation: {who} (eval.{key})"] = row if context == "row" else (
                int(context) if context.isdigit() else None)
        bad = untaught_contexts(taught, asked)
        if bad:
            raise PipelineError(f"{'; '.join(bad)}: warm-up SFT never taught this prompt context (data_prep "
                                f"sft.warmup.contexts={list(taught)}); add it there (data.overrides) or ask in a "
                                "taught context. Nothing was run")

    def _selection_args(self) -> list[str]:
        """The evaluation's prompt, exclusion and device settings for the selection child: the GRPO
        row's context and budget (``eval.grpo_prompt``, else ``--prompt-context`` /
        ``--max-prompt-tokens`` of ``eval.args``, else 3 and 384), ``--exclusion`` and ``--decode`` of
        ``eval.args`` (checkpoints are chosen decoded as the evaluation decodes them) and the profile's device. A value the evaluation would refuse is a :class:`PipelineError`."""
        flag = self._eval_flag
        context, budget = self._eval_prompt("grpo_prompt")
        if context not in ("row", "1", "2", "3"):
            raise PipelineError(f"grpo.select_by_val: the GRPO row's prompt context must be 1, 2, 3 or row "
                                f"(eval.grpo_prompt / --prompt-context), got {context!r}")
        if budget.lower() != "none" and not (budget.isdigit() and int(budget) >= 0):
            raise PipelineError(f"grpo.select_by_val: the GRPO row's prompt budget must be a number of tokens or "
                                f"none (eval.grpo_prompt / --max-prompt-tokens), got {budget!r}")
        from conrec_verl.core.eval_data import DECODES

        decode = flag("--decode", "beam")
        if decode not in DECODES:
            raise PipelineError(f"grpo.select_by_val: eval.args --decode must be one of {', '.join(DECODES)}, "
                                f"got {decode!r}")
        return ["--context", context, "--budget", budget, "--exclusion", flag("--exclusion", "interacted"),
                "--decode", decode, "--device", "cuda" if self.profile.device == "cuda" else "cpu"]

    def _select_by_eval_metric(self, phase: Phase, metric: str, include_start: bool, model: Path,
                               ckpt: Path) -> tuple[int, dict]:
        """The GRPO step (0 = the starting model, with ``include_start``) whose ``metric`` (FHR@K/HR@K)
        on the validation users' rows is highest, ties to the earlier step, by
        :mod:`conrec_verl.evaluation.select` in a child process (its output in the phase log)."""
        last = self._checkpoint_step(ckpt)  # steps of this run only, not leftovers of an earlier one
        steps = sorted(s for s in (int(p.parents[2].name.rsplit("_", 1)[1])
                                   for p in ckpt.glob("global_step_*/actor/huggingface/config.json")) if s <= last)
        models = ([("0", str(model))] if include_start else []) + \
            [(str(s), str(ckpt / f"global_step_{s}" / "actor" / "huggingface")) for s in steps]
        if not models:
            raise PipelineError(f"grpo.select_by_val: no checkpoint with a Hugging Face export under {ckpt}")
        out = self.run / "grpo_val.json"
        cmd = [sys.executable, "-m", "conrec_verl.evaluation.select", "--data", str(self.run / "data"),
               "--metric", metric, *self._selection_args(), "--out", str(out)]
        for name, folder in models:
            cmd += ["--model", f"{name}={folder}"]
        self._run(phase.name, cmd)
        scores = json.loads(out.read_text())["scores"]
        values = {int(name): float(v) for name, v in scores.items() if math.isfinite(float(v))}
        if not values:
            raise PipelineError(f"grpo.select_by_val: no finite {metric} in {out}")
        best = max(values.values())
        return min(s for s, v in values.items() if v == best), {str(s): round(v, 5) for s, v in sorted(values.items())}

    def compose_configs(self, requests: dict[str, tuple]) -> dict[str, dict]:
        """``{name: resolved config}`` of verl configs (``(config name, overrides)``; or another
        Hydra config folder's: ``(name, overrides, folder)``) composed with their overrides, in one
        child process (:mod:`conrec_verl.runtime.compose`; the launcher stays free of torch and
        verl); a config that does not compose is a :class:`PipelineError` naming it and Hydra's message."""
        req = {name: {"config_dir": str(r[2] if len(r) > 2 else RECIPE_DIR / "config"), "config_name": str(r[0]),
                      "overrides": list(r[1])} for name, r in requests.items()}
        proc = subprocess.run([sys.executable, "-m", "conrec_verl.runtime.compose"], input=json.dumps(req),
                              capture_output=True, text=True, env=self.env)
        try:
            out = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise PipelineError(f"could not compose the verl configs (exit {proc.returncode}): "
                                f"{proc.stderr.strip()[-2000:]}") from None
        bad = {name: r["error"] for name, r in out.items() if not r.get("ok")}
        if bad:
            name, error = next(iter(bad.items()))
            kind = "config" if len(requests[name]) > 2 else "verl config"
            raise PipelineError(f"phase {name}: its {kind} {requests[name][0]} with the profile's overrides does "
                                f"not compose, nothing was run: {error}")
        return {name: r["config"] for name, r in out.items()}

    def check_configs(self, phases: Sequence[Phase], state: dict) -> None:
        """Compose every training phase's verl config before the first phase runs, so a bad
        override stops the pipeline in seconds, not after data prep and every SFT stage."""
        requests: dict[str, tuple[str, list[str]]] = {}
        placeholder_model, data = self.run / "models" / "base", self.run / "data"
        for phase in phases:
            if phase.name.startswith("sft_"):
                stage = next(s for s in self.profile.sft.stages if s.name == phase.name[len("sft_"):])
                requests[phase.name] = (str(self.profile.sft.config), self._sft_overrides(
                    stage, placeholder_model, data / str(stage.file), self.run / "sft" / stage.name))
            elif phase.name == "grpo":
                extra = [f"++data.conrec.row_weights={self.run / 'grpo_cleaning'}"] if self._cleaning_rule() else []
                requests["grpo"] = (str(self.profile.grpo.config),
                                    self._grpo_overrides(placeholder_model, data, self.run / "grpo") + extra)
        contexts = bool({p.name for p in phases} & {"sft_warmup", "grpo", "eval"}) and any(
            str(s.name) == "warmup" for s in self.profile.sft.stages)
        if contexts and self._data_prep_request() is not None:
            requests["data"] = self._data_prep_request()
        composed = self.compose_configs(requests) if requests else {}
        if contexts:
            self.check_contexts(composed.get("grpo"), composed.get("data"))
        if requests:
            for phase in phases:
                if not phase.name.startswith("sft_"):
                    continue
                stage = next(s for s in self.profile.sft.stages if s.name == phase.name[len("sft_"):])
                if not stage.get("select_by_val"):
                    continue
                loggers = composed[phase.name].get("trainer", {}).get("logger") or []
                if "console" not in (loggers if isinstance(loggers, list) else [loggers]):
                    raise PipelineError(f"SFT stage {stage.name}: select_by_val reads the validation loss from the "
                                        "console log; keep 'console' in trainer.logger")
                val = self.run / "data" / str(stage.select_by_val)
                if "data" in state["done"] and not val.is_file():
                    raise PipelineError(f"SFT stage {stage.name}: select_by_val file {stage.select_by_val} is not in "
                                        f"{self.run / 'data'}")

    def phase_data(self, phase: Phase, state: dict) -> dict:
        data = self.run / "data"
        if not (data / "manifest.json").is_file():
            cmd = [sys.executable, "-m", "conrec_verl.data_prep", "--config-name", str(self.profile.data.config),
                   f"out_dir={data}", *map(str, self.profile.data.overrides)]
            if self.profile.data.get("input_path"):
                cmd.append(f"input.path={self.profile.data.input_path}")
            self._run(phase.name, cmd)
        state["sid_build"] = self.check_data_folder(state)
        return {"sid_build": state["sid_build"]}

    def phase_model(self, phase: Phase, state: dict) -> dict:
        self.check_data_folder(state)
        out = self.run / "models" / "base"
        m = self.profile.model
        if m.base:
            from conrec_verl.core.sid import Codebook

            sizes = ",".join(map(str, Codebook.load(self.run / "data" / "codebook.npz").sizes))
            cmd = [sys.executable, "-m", "conrec_verl.model_builder", "extend", "--model", str(m.base),
                   "--sid-sizes", sizes, "--out", str(out), "--overwrite"]
        else:
            cmd = [sys.executable, "-m", "conrec_verl.model_builder", "tiny", "--data-dir", str(self.run / "data"),
                   "--out", str(out), "--layers", str(m.tiny.layers), "--hidden", str(m.tiny.hidden),
                   "--seed", str(m.tiny.seed), "--sid-init", str(m.tiny.get("sid_init", "random")),
                   "--overwrite"]  # a rerun replaces a half-built base
        self._run(phase.name, cmd)
        return {"path": str(out)}

    def _current_model(self, state: dict) -> Path:
        """The newest model: the last finished SFT stage's export, else the base model (this run's,
        or the one a --from run reused)."""
        model = Path((state["done"].get("model") or {}).get("path") or self.run / "models" / "base")
        for stage in self.profile.sft.stages:
            done = state["done"].get(f"sft_{stage.name}")
            if done and done.get("path"):
                model = Path(done["path"])
        return model

    def phase_sft(self, phase: Phase, state: dict) -> dict:
        self.check_data_folder(state)
        name = phase.name[len("sft_"):]
        stage = next(s for s in self.profile.sft.stages if s.name == name)
        train = self.run / "data" / str(stage.file)
        if not train.is_file():
            if stage.get("optional", False):
                self.echo(f"    {train.relative_to(self.run)} not in the data folder (no item text): stage skipped")
                return {"skipped": True}
            raise PipelineError(f"SFT stage {name}: {train} missing from the data folder")
        model = self._current_model(state)
        ckpt = self.run / "sft" / name
        lora = []
        sid_lora = self.profile.sft.get("sid_lora")
        if sid_lora:  # a LoRA stage whose SID token rows (embeddings, lm_head) train too
            from conrec_verl.model_builder import init_sid_lora_adapter

            adapter = init_sid_lora_adapter(model, self.run / "sft" / f"{name}_adapter", r=int(sid_lora.rank),
                                            lora_alpha=float(sid_lora.alpha))
            lora = [f"model.lora_rank={int(sid_lora.rank)}", f"model.lora_alpha={float(sid_lora.alpha)}",
                    f"model.lora_adapter_path={adapter}"]
        from conrec_verl.runtime.cpu_env import torchrun_cmd  # torchrun, its stores on 127.0.0.1

        cmd = [*torchrun_cmd(self.profile.sft.nproc), "-m", "verl.trainer.sft_trainer",
               "--config-path", str(RECIPE_DIR / "config"), "--config-name", str(self.profile.sft.config),
               *lora, *self._sft_overrides(stage, model, train, ckpt)]
        if stage.get("select_by_val") and not (self.run / "data" / str(stage.select_by_val)).is_file():
            raise PipelineError(f"SFT stage {name}: select_by_val file {stage.select_by_val} is not in the data folder "
                                "(data_prep writes sft/warmup_val.parquet when samples.val_user_fraction > 0)")
        self._run(phase.name, cmd)
        info: dict = {}
        step = None
        if stage.get("select_by_val"):
            step, losses = self.choose_step(self.run / "logs" / f"{phase.name}.log", "val/loss", "min", ckpt,
                                            "huggingface", f"SFT stage {name}: select_by_val")
            info = {"val_loss": losses, "chosen_step": step}
            self.echo(f"    validation loss by step {info['val_loss']}: exporting step {step}")
        export = self._export(ckpt, self.run / "models" / f"sft_{name}", sub="huggingface", step=step)
        return {"path": str(export), **info}

    def _export(self, ckpt: Path, dest: Path, sub: str, step: int | None = None) -> Path:
        """Copy the Hugging Face export of the newest checkpoint under ``ckpt`` (or of ``step``) to ``dest``."""
        tracker = ckpt / "latest_checkpointed_iteration.txt"
        if not tracker.is_file():
            raise PipelineError(f"{ckpt}: no checkpoint was written (is save_freq / hf_model export configured?)")
        step = tracker.read_text().strip() if step is None else int(step)
        src = ckpt / f"global_step_{step}" / sub
        if not (src / "config.json").is_file():
            raise PipelineError(f"{src}: no Hugging Face export (checkpoint.save_contents must include hf_model)")
        lora_meta = src.parent / "lora_train_meta.json"
        if lora_meta.is_file():  # a LoRA SFT stage: merge the adapters into a plain model
            from conrec_verl.model_builder import merge_lora_export

            meta = json.loads(lora_meta.read_text())
            return merge_lora_export(src, dest, lora_alpha=meta["lora_alpha"], r=meta["r"])
        with atomic_dir(dest) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        return dest

    def phase_grpo(self, phase: Phase, state: dict) -> dict:
        self.check_data_folder(state)
        model = self._current_model(state)
        data = self.run / "data"
        ckpt = self.run / "grpo"
        cmd = [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", str(RECIPE_DIR / "config"),
               "--config-name", str(self.profile.grpo.config), *self._grpo_overrides(model, data, ckpt)]
        info: dict = {}
        if self._cleaning_rule() is None:
            self._run(phase.name, cmd)
        else:
            info["cleaning"] = self._grpo_with_cleaning(phase, cmd, model, data, ckpt)
        step = None
        selection = self._grpo_selection()
        if selection:
            metric, mode, include_start = selection
            if METRIC_RE.match(metric):
                step, values = self._select_by_eval_metric(phase, metric, include_start, Path(model), ckpt)
            else:
                step, values = self.choose_step(
                    self.run / "logs" / f"{phase.name}.log", metric, mode, ckpt, "actor/huggingface",
                    "grpo.select_by_val (verl logs val-core/<data_source>/acc/mean@1 and "
                    "val-aux/<data_source>/reward/mean@1)")
            info["val"] = {"metric": metric, "by_step": values, "chosen_step": step}
            self.echo(f"    {metric} by step {info['val']['by_step']}: exporting step {step}"
                      + (" (no GRPO checkpoint beat the starting model on validation: it is exported unchanged)"
                         if step == 0 else ""))
        if step == 0:
            export = self.run / "models" / "grpo"
            with atomic_dir(export) as tmp:
                shutil.copytree(model, tmp, dirs_exist_ok=True)
            return {"path": str(export), "started_model_kept": True, **info}
        export = self._export(ckpt, self.run / "models" / "grpo", sub="actor/huggingface", step=step)
        return {"path": str(export), **info}

    # -- cross-stage cleaning ------------------------------------------------------------------
    def _cleaning_rule(self):
        """The profile's ``grpo.cleaning`` rule, or None when cleaning is off."""
        from conrec_verl.core.cleaning import CleaningError, CleaningRule

        block = self.profile.grpo.get("cleaning")
        block = OmegaConf.to_container(block, resolve=True) if block is not None else {}
        if not block or not block.get("enabled", False):
            return None
        try:
            return CleaningRule.from_mapping(block)
        except CleaningError as exc:
            raise PipelineError(f"grpo.{exc}") from None

    def _grpo_with_cleaning(self, phase: Phase, cmd: list[str], model: Path, data: Path, ckpt: Path) -> dict:
        """Progressive GRPO one stage per main_ppo run (verl's ``resume_mode=auto`` carries the model,
        the optimizer and the data position across), screening each next stage's rows with the model
        at the end of the previous one (:mod:`conrec_verl.cleaning`) before it trains."""
        from dataclasses import asdict

        from conrec_verl.core.cleaning import decision_path
        from conrec_verl.core.schedule import ScheduleError, StageSchedule

        rule = self._cleaning_rule()
        folder = self.run / "grpo_cleaning"
        weights = [f"++data.conrec.row_weights={folder}"]
        cfg = OmegaConf.create(self.compose_configs(
            {"grpo": (str(self.profile.grpo.config), self._grpo_overrides(model, data, ckpt) + weights)})["grpo"])
        if cfg.algorithm.get("adv_estimator") != "progressive_grpo":
            raise PipelineError("grpo.cleaning needs algorithm.adv_estimator=progressive_grpo (its stages)")
        try:
            schedule = StageSchedule.from_config(cfg.algorithm.progressive_grpo, where="algorithm.progressive_grpo")
        except ScheduleError as exc:
            raise PipelineError(str(exc)) from None
        if not cfg.trainer.save_freq or cfg.trainer.save_freq <= 0 or cfg.trainer.resume_mode != "auto":
            raise PipelineError("grpo.cleaning runs one main_ppo per stage and resumes each from the last "
                                "checkpoint: it needs trainer.save_freq > 0 and trainer.resume_mode=auto")
        cfg_files = cfg.data.train_files
        train_files = [cfg_files] if isinstance(cfg_files, str) else list(cfg_files)
        if len(train_files) != 1:
            raise PipelineError(f"grpo.cleaning screens one training file, data.train_files is {train_files}")
        if int(cfg.data.get("train_max_samples") or -1) > 0:
            raise PipelineError("grpo.cleaning screens every row of data.train_files; data.train_max_samples would "
                                "draw a subset the decisions do not index: drop one of them")
        for stage in schedule.stages:  # decisions of an earlier run must follow the same rule
            path = decision_path(folder, stage.index)
            if path.is_file():
                old_rule = json.loads(path.read_text()).get("rule")
                if old_rule != asdict(rule):
                    raise PipelineError(f"{path} was screened with cleaning rule {old_rule}, the profile now says "
                                        f"{asdict(rule)}: delete {folder} and {ckpt} to retrain with the new rule, or "
                                        "use a new --run-dir")
        last = schedule.total_steps
        if cfg.trainer.get("total_training_steps"):
            last = min(last, int(cfg.trainer.total_training_steps))
        decisions = {}
        for stage in schedule.stages:
            if stage.start_step > last:
                break
            end = min(stage.end_step, last)
            if self._checkpoint_step(ckpt) >= end:
                continue
            if stage.index > 1 and not decision_path(folder, stage.index).is_file():
                if self._checkpoint_step(ckpt) != stage.start_step - 1:
                    raise PipelineError(f"{ckpt}: the newest checkpoint is step {self._checkpoint_step(ckpt)}, "
                                        f"not the end of stage {stage.index - 1} (step {stage.start_step - 1}); "
                                        "cannot screen the next stage with that stage's model")
                prev = self._export(ckpt, self.run / "models" / f"grpo_stage{stage.index - 1}", sub="actor/huggingface")
                self.echo(f"    cleaning: the stage {stage.index - 1} model screens stage {stage.index}'s rows "
                          f"(context {stage.context})")
                screen = [sys.executable, "-m", "conrec_verl.cleaning", "--model", str(prev), "--data", str(data),
                          "--rl-file", str(train_files[0]), "--stage", str(stage.index),
                          "--context", str(stage.context), "--out", str(folder),
                          "--stage-rows", str(cfg.data.conrec.get("stage_rows") or "assigned"),
                          "--max-prompt-tokens", str(cfg.data.max_prompt_length),
                          "--action", rule.action, "--repeat", str(rule.repeat), "--top-n", str(rule.top_n),
                          "--device", "cuda" if self.profile.device == "cuda" else "cpu"]
                screen += ["--threshold", str(rule.threshold)] if rule.threshold is not None else \
                    ["--share", str(rule.share)]
                self._run(phase.name, screen)
            self.echo(f"    stage {stage.index}/{len(schedule.stages)} ({stage.name}): steps {stage.start_step}-{end}")
            self._run(phase.name, [*cmd, *weights, f"trainer.total_training_steps={end}"])
        for stage in schedule.stages:
            path = decision_path(folder, stage.index)
            if path.is_file():
                d = json.loads(path.read_text())
                decisions[str(stage.index)] = {k: d.get(k) for k in ("screened", "rows_with_future_likes", "flagged",
                                                                      "sim_fps_mean")}
        return decisions

    @staticmethod
    def _checkpoint_step(ckpt: Path) -> int:
        tracker = ckpt / "latest_checkpointed_iteration.txt"
        return int(tracker.read_text().strip()) if tracker.is_file() else 0

    def phase_eval(self, phase: Phase, state: dict) -> dict:
        self.check_data_folder(state)
        rows = []
        ev = self.profile.eval
        warm = state["done"].get("sft_warmup", {}).get("path")
        if warm:
            rows += ["--model", f"warm-up SFT={warm}"]
            if ev.get("warmup_prompt"):
                rows += ["--model-prompt", f"warm-up SFT={ev.warmup_prompt}"]
        grpo = state["done"].get("grpo", {}).get("path")
        if grpo:
            rows += ["--model", f"progressive GRPO={grpo}"]
            if ev.get("grpo_prompt"):
                rows += ["--model-prompt", f"progressive GRPO={ev.grpo_prompt}"]
        align = state["done"].get("sft_alignment", {}).get("path")
        if align:  # the forget rate's reference: the alignment-SFT model (paper Table 3)
            rows += ["--forget-reference-model", str(align)]
        cmd = [sys.executable, "-m", "conrec_verl.evaluation", "--data", str(self.run / "data"),
               "--out", str(self.run / "eval"), "--k", str(self.profile.eval.k), *rows,
               *map(str, self.profile.eval.args)]
        self._run(phase.name, cmd)
        metrics = json.loads((self.run / "eval" / "metrics.json").read_text())
        return {"report": str(self.run / "eval" / "report.md"), "summary": summarise(metrics, self.profile.eval.k)}


def summarise(metrics: dict, k: int) -> dict[str, float]:
    """``{row name: FHR@k}`` from conrec-eval's metrics.json."""
    out = {}
    rows = metrics.get("rows", metrics)
    items = rows.items() if isinstance(rows, dict) else ((r.get("name"), r) for r in rows)
    for name, row in items:
        if not isinstance(row, dict):
            continue
        val = row.get(f"FHR@{k}", row.get("metrics", {}).get(f"FHR@{k}") if isinstance(row.get("metrics"), dict) else None)
        if isinstance(val, (int, float)):
            out[str(name)] = float(val)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="conrec-pipeline", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--run-dir", default="runs/kuairand", help="the run folder (default: %(default)s)")
    parser.add_argument("--profile", default="cpu_tiny",
                        help="a profile in recipes/conrec/pipeline/ or a yaml path (default: %(default)s)")
    parser.add_argument("--only", default="", help="comma-separated phases to run (default: all)")
    parser.add_argument("--from", dest="start_from", default=None, metavar="RUN",
                        help="start this run folder from another run folder's finished phases (its data folder is "
                             "linked; --reuse picks the phases, default every finished phase before GRPO): e.g. new "
                             "GRPO settings on the same SFT models")
    parser.add_argument("--reuse", default=None, help="with --from: comma-separated phases to reuse")
    parser.add_argument("--allow-profile-change", action="store_true",
                        help="continue a run folder with other profile settings than it was started with")
    parser.add_argument("overrides", nargs="*", help="profile overrides key=value, e.g. "
                        "grpo.overrides=[trainer.total_training_steps=6] (replaces the list) or "
                        "grpo.overrides+=[trainer.save_freq=4] (appends to it); the keys are listed below")
    parser.epilog = (parser.epilog or "") + "\nProfile keys (cpu_tiny; a key=value override must name one):\n  " + \
        "\n  ".join(profile_keys())
    args = parser.parse_args(argv)
    import signal

    previous = signal.signal(signal.SIGTERM, _raise_terminated)  # kill = Ctrl-C: children stopped
    try:
        profile = load_profile(args.profile, args.overrides)
        pipe = Pipeline(Path(args.run_dir), profile, allow_profile_change=args.allow_profile_change)
        pipe.run_all(only=[p for p in args.only.split(",") if p], start_from=args.start_from,
                     reuse=[p for p in args.reuse.split(",") if p] if args.reuse else None)
        state = pipe._load_state()
        summary = state["done"].get("eval", {}).get("summary")
        if summary:
            k = profile.eval.k
            print(f"\nFHR@{k} on the evaluation split ({pipe.run / 'eval' / 'report.md'}):")
            width = max(len(n) for n in summary)
            for name, val in summary.items():
                print(f"  {name:<{width}}  {val:.4f}")
    except PipelineError as exc:
        print(f"conrec-pipeline: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        why = "terminated" if isinstance(exc, _Terminated) else "interrupted"
        print(f"conrec-pipeline: {why}; the running phase's processes were stopped. Run the same command again "
              "to continue after the last finished phase.", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
