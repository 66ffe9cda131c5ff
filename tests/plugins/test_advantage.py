"""``progressive_grpo`` driven through verl's own ``compute_advantage`` paths with the step set
through ``SkipManager``, compared with verl's ``grpo``; and proof that the per-stage beta changes
the objective verl's actor optimises at the stage boundary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from verl import DataProto
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.core_algos import agg_loss, get_adv_estimator_fn, get_policy_loss_fn, kl_penalty
from verl.trainer.ppo.ray_trainer import compute_advantage
from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories
from verl.utils.config import omega_conf_to_dataclass
from verl.utils.skip import SkipManager

from conrec_verl.plugins.advantage import compute_progressive_grpo_advantage, stage_metrics
from conrec_verl.core.schedule import StageSchedule

KL_REF = 0.5  # large enough that the KL gradient is visible next to the pg gradient
STAGES = "[{context: 1, steps: 3, beta: 0.5}, {context: 2, steps: 2, beta: 0.25}, {context: 3, steps: 2, beta: 2.0, norm_adv_by_std: false}]"


def batch(seed=0, groups=4, n=4, length=6):
    g = torch.Generator().manual_seed(seed)
    bs = groups * n
    mask = torch.ones(bs, length)
    lengths = torch.randint(2, length + 1, (bs,), generator=g)
    for i, L in enumerate(lengths):
        mask[i, L:] = 0
    rewards = torch.zeros(bs, length)
    scores = torch.randn(bs, generator=g)
    rewards[torch.arange(bs), lengths - 1] = scores
    uid = np.array([f"u{i // n}" for i in range(bs)], dtype=object)
    data = DataProto.from_dict(tensors={"token_level_rewards": rewards, "response_mask": mask},
                               non_tensors={"uid": uid})
    return data


@pytest.fixture
def config(compose):
    def make(stages=STAGES, kl_ref=KL_REF, extra=(), beta_via="advantage_scale"):
        overrides = [
            "algorithm.adv_estimator=progressive_grpo",
            "actor_rollout_ref.actor.use_kl_loss=true",
            f"actor_rollout_ref.actor.kl_loss_coef={kl_ref}",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
            "+algorithm.progressive_grpo.kl_ref=${actor_rollout_ref.actor.kl_loss_coef}",
            f"+algorithm.progressive_grpo.stages={stages}",
            f"+algorithm.progressive_grpo.beta_via={beta_via}",
            *extra,
        ]
        return compose(overrides)

    return make


@pytest.fixture(autouse=True)
def reset_step():
    yield
    SkipManager.set_step(-1)


def progressive(cfg, data, step, v1=True):
    SkipManager.set_step(step)
    data = DataProto.from_dict(tensors=dict(data.batch.items()), non_tensors=dict(data.non_tensor_batch))
    if v1:  # what main_ppo's default (v1) trainer calls
        keys = [f"{uid}_0_0" for uid in data.non_tensor_batch["uid"]]
        out = compute_advantage_for_multi_trajectories(
            data, batch_keys=keys, adv_estimator=cfg.algorithm.adv_estimator, config=cfg.algorithm,
            norm_adv_by_std_in_grpo=cfg.algorithm.norm_adv_by_std_in_grpo)
    else:  # legacy trainer path
        out = compute_advantage(data, adv_estimator=cfg.algorithm.adv_estimator, config=cfg.algorithm)
    return out.batch["advantages"], out.batch["returns"]


def verl_grpo(data, norm=True):
    data = DataProto.from_dict(tensors=dict(data.batch.items()), non_tensors=dict(data.non_tensor_batch))
    out = compute_advantage(data, adv_estimator=core_algos.AdvantageEstimator.GRPO, norm_adv_by_std_in_grpo=norm,
                            config=OmegaConf.create({}))
    return out.batch["advantages"]


def test_registered():
    assert get_adv_estimator_fn("progressive_grpo") is compute_progressive_grpo_advantage


@pytest.mark.parametrize("v1", [True, False])
def test_neutral_schedule_equals_verl_grpo(config, v1):
    cfg = config(stages="[{context: 2, steps: 5}]")
    data = batch()
    for step in (1, 3, 9):
        adv, ret = progressive(cfg, data, step, v1=v1)
        torch.testing.assert_close(adv, verl_grpo(data))
        torch.testing.assert_close(ret, adv)
    cfg = config(stages="[{context: 2, steps: 5, norm_adv_by_std: false}]")
    torch.testing.assert_close(progressive(cfg, data, 2, v1=v1)[0], verl_grpo(data, norm=False))
    assert not torch.allclose(verl_grpo(data, norm=False), verl_grpo(data))


def test_stage_follows_skipmanager_step(config, capsys):
    cfg = config()
    data = batch(seed=3)
    grpo, grpo_unnorm = verl_grpo(data), verl_grpo(data, norm=False)
    for step in (1, 2, 3):  # stage 1: beta == kl_ref
        torch.testing.assert_close(progressive(cfg, data, step)[0], grpo)
    for step in (4, 5):  # stage 2: beta = kl_ref / 2 -> advantages x2
        torch.testing.assert_close(progressive(cfg, data, step)[0], 2.0 * grpo)
    for step in (6, 7, 50):  # stage 3: beta = 4 kl_ref, no std normalisation -> x1/4
        torch.testing.assert_close(progressive(cfg, data, step)[0], 0.25 * grpo_unnorm)
    # "resume" in the middle of stage 2: only the step matters
    torch.testing.assert_close(progressive(cfg, data, 5)[0], 2.0 * grpo)
    out = capsys.readouterr().out
    assert "stage 2/3" in out and "stage 3/3" in out


def actor_objective(actor_cfg, advantages, log_prob, old_log_prob, ref_log_prob, mask):
    """The loss verl's actor minimises (verl/workers/utils/losses.py: ppo_loss): pg + kl_loss_coef * KL."""
    pg_loss, _ = get_policy_loss_fn(actor_cfg.policy_loss.get("loss_mode", "vanilla"))(
        old_log_prob=old_log_prob, log_prob=log_prob, advantages=advantages, response_mask=mask.bool(),
        loss_agg_mode=actor_cfg.loss_agg_mode, config=actor_cfg)
    kld = kl_penalty(logprob=log_prob, ref_logprob=ref_log_prob, kl_penalty=actor_cfg.kl_loss_type)
    kl_loss = agg_loss(loss_mat=kld, loss_mask=mask, loss_agg_mode=actor_cfg.loss_agg_mode)
    return pg_loss, kl_loss, pg_loss + actor_cfg.kl_loss_coef * kl_loss


def test_per_stage_beta_changes_the_optimised_objective_at_the_boundary(config):
    cfg = config()
    actor_cfg = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert actor_cfg.use_kl_loss and actor_cfg.kl_loss_coef == KL_REF
    schedule = StageSchedule.from_config(cfg.algorithm.progressive_grpo)
    data = batch(seed=5)
    mask = data.batch["response_mask"]
    g = torch.Generator().manual_seed(11)
    base = torch.randn(mask.shape, generator=g) * 0.1 - 1.0
    old_log_prob = base
    ref_log_prob = base + torch.randn(mask.shape, generator=g) * 0.3

    def grad_and_update(step=None, adv=None, kl_weight=None):
        log_prob = (base + 0.01).clone().requires_grad_(True)
        if adv is None:
            adv = progressive(cfg, data, step)[0]
        if kl_weight is None:
            loss = actor_objective(actor_cfg, adv, log_prob, old_log_prob, ref_log_prob, mask)[2]
        else:
            pg, kl, _ = actor_objective(actor_cfg, adv, log_prob, old_log_prob, ref_log_prob, mask)
            loss = pg + kl_weight * kl
        loss.backward()
        grad = log_prob.grad.clone()
        opt = torch.optim.Adam([log_prob], lr=1e-2, eps=1e-12)
        before = log_prob.detach().clone()
        opt.step()
        return grad, log_prob.detach() - before

    grpo = verl_grpo(data)
    for step in (3, 4):
        stage = schedule.stage_at(step)
        c = schedule.advantage_scale(stage)
        grad, update = grad_and_update(step=step)
        # the actor's loss is c * (L_pg + beta_stage * KL) ...
        ref_grad, ref_update = grad_and_update(adv=grpo, kl_weight=stage.beta)
        torch.testing.assert_close(grad / c, ref_grad)
        # ... and Adam takes the same step as when optimising L_pg + beta_stage * KL directly
        torch.testing.assert_close(update, ref_update, rtol=1e-4, atol=1e-7)
    # the boundary really changes the objective: the gradient direction differs between stages
    g3, _ = grad_and_update(step=3)
    g4, _ = grad_and_update(step=4)
    cos = torch.nn.functional.cosine_similarity(g3.flatten(), g4.flatten(), dim=0)
    assert cos < 0.9999
    # and it is the KL weight that changed: a KL weight of kl_ref at step 4 would reproduce step 3
    _, plain_update = grad_and_update(adv=grpo, kl_weight=KL_REF)
    _, step4_update = grad_and_update(step=4)
    assert not torch.allclose(plain_update, step4_update, rtol=1e-3, atol=1e-7)


def test_kl_loss_mode_leaves_verl_grpo_advantages_alone(config):
    cfg = config(beta_via="kl_loss")
    data = batch(seed=3)
    for step in (1, 4, 6):
        norm = step < 6  # stage 3 has norm_adv_by_std: false
        torch.testing.assert_close(progressive(cfg, data, step)[0], verl_grpo(data, norm=norm))


def test_stage_loss_fn_is_verls_ppo_loss_with_the_stage_beta(config):
    import inspect

    from verl.workers.utils import losses

    from conrec_verl.plugins.trainer_mode import stage_loss_fn

    cfg = config(beta_via="kl_loss")
    fn = stage_loss_fn(cfg.actor_rollout_ref.actor, 0.25)
    assert fn.func is losses.ppo_loss
    worker_cfg = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)  # what the worker binds at start-up
    assert fn.keywords["config"].kl_loss_coef == 0.25 and worker_cfg.kl_loss_coef == KL_REF
    for name in ("use_kl_loss", "kl_loss_type", "loss_agg_mode", "entropy_coeff", "clip_ratio"):
        assert getattr(fn.keywords["config"], name) == getattr(worker_cfg, name), name
    # compatibility guard: verl 0.9.1's ppo_loss weights the KL term by config.kl_loss_coef
    assert "kl_loss * config.kl_loss_coef" in inspect.getsource(losses.ppo_loss)


def _train(actor_cfg_for_step, adv_for_step, steps, data, kl_weight_for_step=None, seed=0):
    """AdamW on a free log-prob tensor for several steps; the loss of each step is verl's actor
    objective (policy loss + kl_loss_coef * KL, ``actor_objective``) with the step's config."""
    mask = data.batch["response_mask"]
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(mask.shape, generator=g) * 0.1 - 1.0
    ref_log_prob = base + torch.randn(mask.shape, generator=g) * 0.3
    theta = (base + 0.01).clone().requires_grad_(True)
    opt = torch.optim.AdamW([theta], lr=1e-2, weight_decay=0.01)
    for step in range(1, steps + 1):
        actor_cfg = actor_cfg_for_step(step)
        old = theta.detach().clone()
        for _ in range(2):  # two mini-batch updates per step, as ppo_epochs would
            pg, kl, total = actor_objective(actor_cfg, adv_for_step(step), theta, old, ref_log_prob, mask)
            loss = total if kl_weight_for_step is None else pg + kl_weight_for_step(step) * kl
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([theta], 1.0)
            opt.step()
    return theta.detach()


def test_true_per_stage_beta_across_stage_boundaries_equals_a_reference_run(config):
    """Several steps through stages 1 -> 2 -> 3 with verl's loss pieces, AdamW and gradient clipping:
    ``beta_via: kl_loss`` (the loss the conrec_sync trainer hands the workers at each boundary)
    trains exactly like a reference run that optimises ``L_pg + beta_stage * KL``; the older
    advantage scaling does not once AdamW's moments carry a stage's scale over a boundary."""
    from conrec_verl.plugins.trainer_mode import stage_loss_fn

    data = batch(seed=5)
    steps = 7
    cfg_kl = config(beta_via="kl_loss")
    schedule = StageSchedule.from_config(cfg_kl.algorithm.progressive_grpo)
    actor_node = cfg_kl.actor_rollout_ref.actor
    losses_by_beta = {}

    def kl_loss_cfg(step):
        beta = schedule.effective_beta(schedule.stage_at(step))
        fn = losses_by_beta.setdefault(beta, stage_loss_fn(actor_node, beta))
        return fn.keywords["config"]

    ours = _train(kl_loss_cfg, lambda step: progressive(cfg_kl, data, step)[0], steps, data)
    base_cfg = omega_conf_to_dataclass(actor_node)
    reference = _train(lambda step: base_cfg, lambda step: verl_grpo(data, norm=step < 6), steps, data,
                       kl_weight_for_step=lambda step: schedule.stage_at(step).beta)
    torch.testing.assert_close(ours, reference)
    cfg_scale = config(beta_via="advantage_scale")
    scaled = _train(lambda step: base_cfg, lambda step: progressive(cfg_scale, data, step)[0], steps, data)
    assert not torch.allclose(scaled, reference, rtol=1e-3, atol=1e-5)


def test_conrec_sync_sets_the_stage_beta_on_the_workers_at_each_stage_change(config):
    from conrec_verl.plugins.trainer_mode import ConrecSyncTrainer

    sent = []

    class Workers:
        def set_loss_fn(self, fn):
            sent.append(fn.keywords["config"].kl_loss_coef)

    def trainer():
        t = object.__new__(ConrecSyncTrainer)
        t.trainer_mode = "conrec_sync"
        t.config = config(beta_via="kl_loss")
        t.actor_rollout_wg = Workers()
        return t

    t = trainer()
    for step in range(1, 8):
        t.global_steps = step
        t._apply_stage_beta()
    assert sent == [0.5, 0.25, 2.0]  # once per stage, at steps 1, 4, 6
    sent.clear()
    resumed = trainer()  # a resume in the middle of stage 2 sets stage 2's beta before its first update
    resumed.global_steps = 5
    resumed._apply_stage_beta()
    assert sent == [0.25]
    sent.clear()
    other = trainer()
    other.config = config(beta_via="advantage_scale")
    other.global_steps = 4
    other._apply_stage_beta()
    assert sent == []


def test_bad_schedule_fails_loudly(config):
    cfg = config(stages="[{context: 7, steps: 1}]")
    with pytest.raises(ValueError, match=r"algorithm.progressive_grpo.stages\[0\].context"):
        progressive(cfg, batch(), 1)


def test_stage_metrics():
    spec = {"kl_ref": 1e-3, "stages": [{"steps": 2, "beta": 1e-3}, {"steps": 2, "beta": 5e-4}]}
    s = StageSchedule.from_config(dict(spec, beta_via="advantage_scale"))
    assert stage_metrics(s, 2)["training/conrec_stage"] == 1.0
    m = stage_metrics(s, 3)
    assert m["training/conrec_stage"] == 2.0 and m["training/conrec_adv_scale"] == pytest.approx(2.0)
    m = stage_metrics(StageSchedule.from_config(spec), 3)  # default: beta in the KL loss, advantages unscaled
    assert m["training/conrec_beta"] == pytest.approx(5e-4) and m["training/conrec_adv_scale"] == 1.0


def test_conrec_sync_trainer_logs_the_stage_every_step(config, monkeypatch):
    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    from conrec_verl.plugins.trainer_mode import ConrecSyncTrainer

    assert get_trainer_cls("conrec_sync") is ConrecSyncTrainer
    assert issubclass(ConrecSyncTrainer, PPOTrainerSync)
    calls = []
    monkeypatch.setattr(PPOTrainerSync, "_compute_metrics",
                        lambda self, batch, metrics, timing_raw, global_steps, epoch: calls.append(global_steps))
    import types

    import transfer_queue as tq

    infos = {f"k{i}": {"reward_extra_info": {"valid_sid": float(i % 2), "context": 1.0}} for i in range(4)}
    monkeypatch.setattr(tq, "kv_batch_get", lambda keys, partition_id, select_fields: {
        "extra_fields": [infos[k] for k in keys]})
    trainer = object.__new__(ConrecSyncTrainer)  # the metric hook only needs the config
    trainer.trainer_mode = "conrec_sync"  # what verl's __init__ assigns ...
    assert trainer.trainer_mode == "sync"  # ... and verl's `== "sync"` branches still see sync
    trainer.config = config()
    batch = types.SimpleNamespace(keys=list(infos), partition_id="train",
                                  tags=[{}, {}, {}, {"is_padding": True}])
    logged = []
    for step in range(1, 8):
        metrics = {}
        trainer._compute_metrics(batch, metrics, {}, step, 0)
        logged.append(metrics["training/conrec_stage"])
        # the reward manager's extra info, averaged over the non-padding samples (0, 1, 0)
        assert metrics["reward_extra/valid_sid/mean"] == pytest.approx(1 / 3)
    assert calls == list(range(1, 8))
    assert logged == [1.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    # another estimator: nothing added
    trainer.config = config(extra=["algorithm.adv_estimator=grpo"])
    metrics = {}
    trainer._compute_metrics(batch, metrics, {}, 4, 0)
    assert "training/conrec_stage" not in metrics


def test_conrec_sync_sets_the_replay_buffer_poll_interval(config):
    """verl's own sync replay buffer, built by verl's ``_build_replay_buffer`` through the conrec
    trainer: ``trainer.v1.sync.poll_interval`` replaces verl's fixed 2 s wait; unset keeps it."""
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

    from conrec_verl.plugins.trainer_mode import ConrecSyncTrainer

    def build(extra):
        trainer = object.__new__(ConrecSyncTrainer)
        trainer.trainer_mode = "conrec_sync"
        trainer.config = config(extra=extra)
        trainer._add_prompts_to_generate = lambda n: None
        return trainer._build_replay_buffer()

    default = build([])
    assert type(default) is ReplayBuffer and default.poll_interval == 2.0
    assert build(["+trainer.v1.sync.poll_interval=0.05"]).poll_interval == 0.05
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ValueError, match="trainer.v1.sync.poll_interval"):
            build([f"+trainer.v1.sync.poll_interval={bad}"])


def test_recipes_poll_the_rollout_quickly():
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[2] / "recipes" / "conrec" / "config"
    for name in ("conrec_cpu_tiny", "conrec_gpu_qwen3"):
        cfg = OmegaConf.load(root / f"{name}.yaml")
        assert cfg.trainer.v1.trainer_mode == "conrec_sync"
        assert 0 < cfg.trainer.v1.sync.poll_interval < 2.0, name
