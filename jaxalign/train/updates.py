"""From a scored rollout to the batch an online family's update trains on.

Each builder makes `to_batch(state, ref_params, rows) -> (batch, metrics, rl_state)`: `rows` the
host's rollout rows (`jaxalign.rl.rollout.rollout_rows`, plus "rewards" [R], the transformed
rewards), `batch` the global update batch (rows sharded, no micro-batch axis), `metrics` scalars
about the rollout, `rl_state` the loop state after this step (KL controller, reward statistics).

- `policy_batch` (ppo, grpo, rloo, reinforce_pp, hc_rlhf): on device, once per rollout before
  any update, with the params that sampled it: the old log-probs (the ratio's denominator, so the
  first minibatch's ratio is exactly 1; none with one update per rollout, where the update's own
  forward gives them: `policy.old_from_update`), the reference's log-probs, PPO's values, then
  the family's advantages.
- `pair_batch` (online_dpo): per prompt, the completion with the higher reward is chosen and the
  other rejected (pairs of equal reward carry no preference and are masked out), laid out as pair
  batches for any paired loss; returned as the list of the update's minibatches (in order).
- `spa_pair_batch` (spa): as `pair_batch`, but the pair is ranked by the policy's own implicit
  reward and kept when confident (`jaxalign.train.self_labels.spa_labels`); the configured
  rewards are only logged.
- `best_batch` (rft): per prompt, the completion with the highest reward, kept when it reaches
  `rl.rft_min_reward`, laid out as SFT batches; returned as a list of minibatches likewise.
  With `rl.rft_self_judge` (self-alignment) the completions are ranked and kept by the policy's
  own judgment (`jaxalign.train.self_labels.self_judge_scores`) instead; the rewards are only
  logged.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.errors import ConfigError
from jaxalign.rl import advantages as adv
from jaxalign.rl import constrained as hc
from jaxalign.rl import kl_control
from jaxalign.rl import rewards as rl_rewards
from jaxalign.train import policy, self_labels

ROLLOUT_ROW_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids", "seq_index")


def grpo_advantages(rl, rewards, mask, kl, kl_coef):
    """GRPO / Dr.GRPO: group-normalised sequence rewards (`rl.scale_rewards`) on every token; the
    KL is a loss term, not in the reward."""
    del kl, kl_coef
    return adv.token_level(
        adv.group_advantages(rewards, rl.group_size, scale=rl.scale_rewards), mask
    )


def rloo_advantages(rl, rewards, mask, kl, kl_coef):
    """RLOO: the sequence reward minus kl_coef * the sequence's summed k1 KL, minus the mean of the
    other completions of its prompt."""
    shaped = rewards - kl_coef * (kl * mask).sum(axis=1)
    return adv.token_level(adv.rloo_advantages(shaped, rl.group_size), mask)


def reinforce_pp_advantages(rl, rewards, mask, kl, kl_coef):
    """REINFORCE++: discounted returns of the k1-shaped token rewards, whitened over the batch."""
    return adv.reinforce_pp_advantages(rewards, kl, mask, kl_coef=kl_coef, gamma=rl.gamma)


def policy_batch(run, estimator: Callable | None, *, kl_in_loss: bool, constrained: bool = False):
    """`to_batch` for the policy-gradient families; `estimator(rl, rewards [R], mask, kl [R, T],
    kl_coef) -> advantages [R, T]` is the family's; None: PPO's GAE on the value head.

    Rewards are transformed first: DAPO's overlong penalty (`rl.overlong_buffer`), then PPO-max's
    division by the running std (`rl.reward_scale`, statistics in the loop state) and clipping
    (`rl.reward_clip`). `constrained` (HC-RLHF, `jaxalign.rl.constrained`): the estimator sees
    the Lagrangian reward r - lambda c with the multiplier of the loop state, which then moves by
    the rollout's pessimistic cost bound (metrics `lambda`, the value the advantages used, and
    `bound`)."""
    value_head = estimator is None
    rl = run.config.rl
    mc, mesh, rules = run.model_config, run.mesh, run.rules
    impl = None if run.config.logprob_impl == "auto" else run.config.logprob_impl
    controller, _ = kl_control.init_kl_controller(**kl_settings(rl))

    own_old = policy.old_from_update(rl, kl_in_loss=kl_in_loss)

    def logps(params, rows):
        return jax.lax.stop_gradient(
            policy.rollout_logps(
                mc,
                params,
                rows,
                temperature=rl.temperature,
                columns=rl.max_new_tokens,
                group=rl.group_size,  # the rollout's rows, in order
                mesh=mesh,
                rules=rules,
                impl=impl,
            )
        )

    def prepare(params, ref_params, rows, rl_state):
        params = run.policy_params(params, ref_params)  # LoRA: the base with the adapters
        mask = rows["loss_mask"] * rows["example_mask"][:, None]
        new_state = dict(rl_state)
        rewards = rows["rewards"]
        if rl.overlong_buffer:
            lengths = rows["loss_mask"].sum(axis=1)
            rewards = rewards + rl_rewards.overlong_penalty(
                lengths, max_len=rl.max_new_tokens, buffer=rl.overlong_buffer
            )
        if rl.reward_scale:
            new_state["reward_stats"] = rl_rewards.update_reward_stats(
                rl_state["reward_stats"], rewards
            )
            rewards = rl_rewards.scale_rewards(
                rewards, new_state["reward_stats"], clip=rl.reward_clip or None
            )
        elif rl.reward_clip:
            rewards = jnp.clip(rewards, -rl.reward_clip, rl.reward_clip)
        hc_metrics = {}
        if constrained:
            safety = rl.safety
            lam = rl_state["lambda"]
            bound = hc.pessimistic_bound(
                rows["costs"],
                n_safety=safety.n,
                delta=safety.delta,
                c1=safety.c1,
                c2=safety.c2,
                tau=safety.tau,
            )
            rewards = hc.lagrangian_rewards(rewards, rows["costs"], lam)
            new_state["lambda"] = hc.update_multiplier(lam, bound, lr=safety.lambda_lr)
            hc_metrics = {"lambda": lam, "bound": bound}
        batch = {k: rows[k] for k in (*ROLLOUT_ROW_KEYS, "example_mask", "sampler_logps")}
        if not own_old:  # else the update's own forward gives them (`policy.old_from_update`)
            batch["old_logps"] = old = logps(params, rows)
        kl_coef = kl_control.kl_coef(rl_state["kl"])
        kl = jnp.zeros_like(mask)
        if rl.kl_coef > 0:
            ref = logps(ref_params, rows)
            if not own_old:
                kl = jnp.where(mask > 0, old - ref, 0.0)  # k1 per token (policy -> reference)
            if kl_in_loss:
                batch["ref_logps"] = ref
        if value_head:
            values = policy.value_estimates(mc, params, rows, mesh=mesh, rules=rules) * mask
            token_rewards = adv.kl_shaped_rewards(rewards, kl, mask, kl_coef=kl_coef)
            advantages, returns = adv.gae(token_rewards, values, mask, gamma=rl.gamma, lam=rl.lam)
            if rl.whiten_advantages:
                advantages = adv.whiten(advantages, mask)
            batch |= {"old_values": values, "returns": returns}
        else:
            advantages = estimator(rl, rewards, mask, kl, kl_coef)
        batch["advantages"] = advantages * mask
        tokens = jnp.maximum(mask.sum(), 1.0)
        # KL per completion (summed over its tokens), the unit of the adaptive controller.
        sequence_kl = (kl * mask).sum() / jnp.maximum(rows["example_mask"].sum(), 1.0)
        new_state["kl"] = kl_control.update_kl_controller(
            controller, rl_state["kl"], sequence_kl, rows["example_mask"].shape[0]
        )
        metrics = {
            "kl_coef": kl_coef,
            "advantages/mean": batch["advantages"].sum() / tokens,
            "reward/transformed": rewards.mean(),
        } | hc_metrics
        if not (own_old and rl.kl_coef > 0):  # else the update reports it (k3, its loss term)
            metrics["kl"] = (kl * mask).sum() / tokens
        if value_head:
            explained = 1.0 - _masked_var(returns - values, mask) / _masked_var(returns, mask)
            metrics["value/explained_variance"] = explained
        return batch, metrics, new_state

    shardings = run.state_shardings.get("rl")
    jitted = jax.jit(prepare, out_shardings=(None, run.replicated, shardings))

    def to_batch(state, ref_params, rows):
        host = {k: v for k, v in rows.items() if k != "rewards"} | {"rewards": rows["rewards"]}
        global_rows = jax.tree.map(lambda x: x[0], run.global_batch([host]))
        return jitted(state["params"], ref_params, global_rows, state["rl"])

    return to_batch


def _masked_var(x, mask):
    n = jnp.maximum(mask.sum(), 1.0)
    mean = (x * mask).sum() / n
    return jnp.maximum((jnp.square(x - mean) * mask).sum() / n, 1e-8)


def kl_settings(rl) -> dict:
    """The KL controller of the config: adaptive (Ziegler et al.) when `rl.kl_target` > 0."""
    if rl.kl_target > 0:
        return dict(kind="adaptive", coef=rl.kl_coef, target=rl.kl_target, horizon=rl.kl_horizon)
    return dict(kind="fixed", coef=rl.kl_coef)


def initial_rl_state(config) -> dict:
    """The loop state an online run carries in its checkpoints; with costs (hc_rlhf) also the
    Lagrange multiplier, starting at 0."""
    _, kl = kl_control.init_kl_controller(**kl_settings(config.rl))
    state = {"kl": kl, "reward_stats": rl_rewards.init_reward_stats()}
    if config.rl.costs or config.rl.cost_model:
        state["lambda"] = jnp.zeros((), jnp.float32)
    return state


def _groups(rows, G):
    """(best, worst, rewards) row indices per prompt group of one host's rows."""
    rewards = np.asarray(rows["rewards"]).reshape(-1, G)
    base = np.arange(rewards.shape[0]) * G
    # The first of equal rewards wins, so choices are deterministic.
    return base + rewards.argmax(axis=1), base + rewards.argmin(axis=1), rewards


def _stacked(run, rows, sides: list[np.ndarray], example_mask: np.ndarray) -> list[dict]:
    """The update minibatches (`rl.minibatches` of them, in order, each stacked into
    `optimizer.grad_accum` micro-batches) of examples whose sequences are the rows `sides[k][e]`
    (pairs: [chosen, rejected]; SFT: [best]): within a micro-batch, side k's sequences come k-th,
    as the pair and SFT layouts want."""
    rl, accum = run.config.rl, run.config.optimizer.grad_accum
    E = len(example_mask)
    if E % (rl.minibatches * accum):
        raise ConfigError(
            f"{E} examples per host do not split into rl.minibatches={rl.minibatches} x "
            f"optimizer.grad_accum={accum}"
        )
    size = E // (rl.minibatches * accum)
    micro = []
    for start in range(0, E, size):
        chosen = slice(start, start + size)
        order = np.concatenate([side[chosen] for side in sides])
        batch = {k: np.asarray(rows[k])[order] for k in ROLLOUT_ROW_KEYS}
        index = np.arange(len(order))[:, None]
        batch["seq_index"] = np.where(batch["seq_index"] >= 0, index, -1).astype(np.int32)
        batch["example_mask"] = example_mask[chosen].astype(np.float32)
        micro.append(batch)
    return [run.global_batch(micro[i : i + accum]) for i in range(0, len(micro), accum)]


def pair_batch(run):
    """`to_batch` for online DPO: chosen = the group's best completion, rejected = its worst
    (group size 2: the two completions); a group whose rewards are all equal carries no
    preference and is masked out. Returns the update's minibatches (in order)."""
    G = run.config.rl.group_size

    def to_batch(state, ref_params, rows):
        best, worst, rewards = _groups(rows, G)
        informative = rewards.max(axis=1) > rewards.min(axis=1)
        real = np.asarray(rows["example_mask"])[best] > 0
        minibatches = _stacked(run, rows, [best, worst], informative & real)
        return minibatches, {"pairs/informative": float(informative.mean())}, state["rl"]

    return to_batch


def best_batch(run):
    """`to_batch` for rejection-sampling fine-tuning: the group's best completion as an SFT
    example, kept when its reward reaches `rl.rft_min_reward`. Returns the update's minibatches
    (in order).

    With `rl.rft_self_judge` the ranking score is the model's own judgment and the threshold is
    on it: "confidence", the completion's mean token log-prob at temperature 1 under the params
    that sampled it (one jitted forward over the rollout; a log-prob threshold); "consistency",
    the share of the group's samples with the same completion (a threshold in (0, 1]).
    `rft/judge_agreement` is the fraction of kept groups whose rewards differ where the
    self-judged best has the group's highest reward."""
    rl, G = run.config.rl, run.config.rl.group_size
    judge = _self_judge(run) if rl.rft_self_judge == "confidence" else None

    def self_judgments(state, ref_params, rows):
        if judge is not None:
            return judge(state["params"], ref_params, rows)
        targets, mask = np.asarray(rows["targets"]), np.asarray(rows["loss_mask"]) > 0
        completions = [t[m] for t, m in zip(targets, mask, strict=True)]
        return self_labels.self_consistency_scores(completions, G)

    def to_batch(state, ref_params, rows):
        rewards = np.asarray(rows["rewards"]).reshape(-1, G)
        base = np.arange(rewards.shape[0]) * G
        metrics = {}
        if not rl.rft_self_judge:
            best = base + rewards.argmax(axis=1)
            kept = rewards.max(axis=1) >= rl.rft_min_reward
        else:
            labels = jax.device_get(
                self_labels.self_judged_best(
                    self_judgments(state, ref_params, rows).reshape(-1, G),
                    min_score=rl.rft_min_reward,
                )
            )
            best, kept = base + labels["best"], labels["keep"]
            judged = kept & (rewards.max(axis=1) > rewards.min(axis=1))
            agree = (rewards.reshape(-1)[best] == rewards.max(axis=1))[judged]
            metrics = {
                "rft/self_judge": float(labels["score"].mean()),
                "rft/judge_agreement": float(agree.mean()) if agree.size else float("nan"),
            }
        kept = kept & (np.asarray(rows["example_mask"])[best] > 0)
        minibatches = _stacked(run, rows, [best], kept)
        return minibatches, {"rft/kept": float(kept.mean())} | metrics, state["rl"]

    return to_batch


def _self_judge(run) -> Callable:
    """Jitted (params, ref_params, host rows [R, T]) -> this host's self-judgments [R] (NumPy)."""
    mc, mesh, rules, config = run.model_config, run.mesh, run.rules, run.config
    impl = None if config.logprob_impl == "auto" else config.logprob_impl

    def scores(params, ref_params, rows):
        logps = policy.rollout_logps(
            mc,
            run.policy_params(params, ref_params),
            rows,
            temperature=1.0,
            mesh=mesh,
            rules=rules,
            impl=impl,
        )
        return self_labels.self_judge_scores(logps, rows["loss_mask"])

    jitted = jax.jit(scores, out_shardings=run.replicated)

    def judge(params, ref_params, rows):
        host = {k: rows[k] for k in ROLLOUT_ROW_KEYS}
        global_rows = jax.tree.map(lambda x: x[0], run.global_batch([host]))
        R = len(rows["rewards"])
        mine = slice(jax.process_index() * R, (jax.process_index() + 1) * R)
        return np.asarray(jitted(params, ref_params, global_rows))[mine]

    return judge


def spa_pair_batch(run):
    """`to_batch` for SPA: per prompt, its samples' implicit rewards s = log pi - log pi_ref
    (sequence sums at temperature 1, the DPO loss's log-probs; one jitted forward of each model
    over the rollout) label the pair (`self_labels.spa_labels` with `loss.beta`), which is kept
    when its confidence exceeds `rl.spa_min_confidence`. `spa/judge_agreement` is the fraction of
    kept pairs whose configured rewards differ that the label orders as the rewards do."""
    config, G = run.config, run.config.rl.group_size
    beta = config.loss.get("beta")
    if not isinstance(beta, int | float) or isinstance(beta, bool) or beta <= 0:
        raise ConfigError(f"loss.beta={beta!r}: spa labels pairs by beta * s, expected beta > 0")
    mc, mesh, rules = run.model_config, run.mesh, run.rules
    impl = None if config.logprob_impl == "auto" else config.logprob_impl

    def sequence_logps(params, rows):
        logps = policy.rollout_logps(
            mc, params, rows, temperature=1.0, mesh=mesh, rules=rules, impl=impl
        )
        return (logps * rows["loss_mask"]).sum(axis=1)

    def both(params, ref_params, rows):
        return sequence_logps(run.policy_params(params, ref_params), rows), sequence_logps(
            ref_params, rows
        )

    jitted = jax.jit(both, out_shardings=(run.replicated, run.replicated))

    def to_batch(state, ref_params, rows):
        host = {k: rows[k] for k in ROLLOUT_ROW_KEYS}
        global_rows = jax.tree.map(lambda x: x[0], run.global_batch([host]))
        R = len(rows["rewards"])
        mine = slice(jax.process_index() * R, (jax.process_index() + 1) * R)
        pol, ref = (
            np.asarray(x)[mine].reshape(-1, G)
            for x in jitted(state["params"], ref_params, global_rows)
        )
        labels = jax.device_get(
            self_labels.spa_labels(pol, ref, beta=beta, min_confidence=config.rl.spa_min_confidence)
        )
        base = np.arange(pol.shape[0]) * G
        chosen, rejected = base + labels["chosen"], base + labels["rejected"]
        kept = labels["keep"] & (np.asarray(rows["example_mask"])[chosen] > 0)
        minibatches = _stacked(run, rows, [chosen, rejected], kept)
        rewards = np.asarray(rows["rewards"])
        judged = kept & (rewards[chosen] != rewards[rejected])
        agree = (rewards[chosen] > rewards[rejected])[judged]
        metrics = {
            "spa/kept": float(kept.mean()),
            "spa/confidence": float(labels["confidence"].mean()),
            "spa/judge_agreement": float(agree.mean()) if agree.size else float("nan"),
        }
        return minibatches, metrics, state["rl"]

    return to_batch
