"""The verl adapters: one module per verl extension point, each thin over ``conrec_verl.core``.

================  =====================================  ===================================
module            what it registers / provides             verl extension point
================  =====================================  ===================================
reward_manager    reward manager ``conrec``               reward-loop manager registry
compute_score     plain ``compute_score`` function        ``reward.custom_reward_function``
advantage         estimator ``progressive_grpo``          ``core_algos.register_adv_est``
trainer_mode      trainer mode ``conrec_sync``            v1 ``register_trainer``
dataset           ``ConrecSidDataset``                    ``data.custom_cls``
entry_point       imports every registering module        ``verl.plugins`` entry point
================  =====================================  ===================================

Importing this package registers nothing; verl imports :mod:`conrec_verl.plugins.entry_point`
through the ``verl.plugins`` entry point in every process it starts. The CPU platform and the
``hf`` rollout backend are in :mod:`conrec_verl.runtime`.
"""
