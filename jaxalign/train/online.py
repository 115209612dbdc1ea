"""The online loop (ppo, grpo, rloo, reinforce_pp, online_dpo, rft, spa, hc_rlhf, gkd), one
straight line per step:

    prompts (checkpointable Grain pipeline) -> sample n completions each with the current params
    (`jaxalign.sampling.generate`, same process, same shardings: nothing is copied or synced) ->
    rewards on the host (rule rewards, a reward model) -> the family's update batch
    (`jaxalign.train.updates`: old and reference log-probs, values, advantages) -> `rl.epochs` x
    `rl.minibatches` jitted updates (`jaxalign.train.steps`, the same step as offline training).

The rollout key of step t is fold_in(key(seed), t): a resumed run samples exactly what the
uninterrupted one would have, and nothing but the step needs saving for it. The checkpoint holds
the params, the optimizer state, the loop state (KL controller, reward statistics) and the prompt
iterator's position. Evaluation answers `data.eval`'s prompts greedily and `rl.eval_samples`
times at the sampling temperature and reports their rewards (means, and per prompt in
WORKDIR/eval/step_N.json).

A constrained family (hc_rlhf) also scores each completion's cost (`rl.costs`, `rl.cost_model`),
carries the Lagrange multiplier in the loop state, and after the last step runs the safety test
on held-out prompts (`safety_test`), written to WORKDIR/safety.json and the summary.
"""

from __future__ import annotations

import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import ArrayLike, Float
from ml_collections import ConfigDict

from jaxalign import sampling, sharding
from jaxalign.checkpoint import manager as ckpt
from jaxalign.errors import ConfigError, DataError, TrainingError
from jaxalign.losses import unit_direction
from jaxalign.models import heads
from jaxalign.rl import constrained
from jaxalign.rl import rewards as rl_rewards
from jaxalign.rl.rollout import rollout_rows
from jaxalign.train.run import Run, Session, check_finite, checkpoint_due, session
from jaxalign.train.workdir import write_atomic

PROMPT_ARRAYS = ("prompt_tokens", "prompt_segment_ids", "prompt_positions", "prompt_lengths")


def sampling_options(run: Run, *, greedy: bool = False, n: int | None = None):
    rl, tok = run.config.rl, run.tokenizer
    return sampling.SamplingOptions(
        max_new_tokens=rl.max_new_tokens,
        n=rl.group_size if n is None else n,
        temperature=0.0 if greedy else rl.temperature,
        top_k=rl.top_k,
        top_p=rl.top_p,
        stop_strings=tuple(rl.stop_strings),
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        seed=run.config.seed,
    )


class Scorer:
    """The configured rewards of completions: the rule rewards of `rl.rewards` and, with
    `rl.reward_model`, a reward model's score weighted by `rl.reward_model_weight` (a
    multi-objective model's r_v = v . r along `rl.reward_direction`, DPA). With `costs=True`
    the costs of a constrained family instead: the rule terms of `rl.costs` (the same syntax)
    and, with `rl.cost_model`, a cost model's score (weight 1)."""

    def __init__(self, run: Run, *, costs: bool = False):
        rl = run.config.rl
        key, terms, model, weight = (
            ("rl.cost_model", rl.costs, rl.cost_model, 1.0)
            if costs
            else ("rl.reward_model", rl.rewards, rl.reward_model, rl.reward_model_weight)
        )
        try:
            self.specs = rl_rewards.rewards_from_config(terms) if terms or not costs else []
        except ConfigError as e:
            raise ConfigError(f"rl.costs: {e}" if costs else str(e)) from None
        self.model, self.key, self.direction = None, key, None
        if rl.reward_direction and not rl.reward_model:
            raise ConfigError("rl.reward_direction is set but rl.reward_model is not")
        if model:
            from jaxalign.train.reward import load_reward_model

            recorded = _recorded_tokenizer(model)
            if (
                recorded
                and pathlib.Path(recorded).resolve() != pathlib.Path(run.config.tokenizer).resolve()
            ):
                raise ConfigError(
                    f"{key}={model} was trained with tokenizer {recorded}, "
                    f"the policy uses {run.config.tokenizer}: it would score other tokens"
                )
            self.model = load_reward_model(model)
            self.path = model
            self.weight = weight
            if rl.reward_direction and not costs:
                try:
                    self.direction = unit_direction(rl.reward_direction)
                except ValueError as e:
                    raise ConfigError(f"rl.reward_direction: {e}") from None
            # A direction of the wrong length, or a missing one, fails now, not at step 0.
            rl_rewards.check_direction(self.model[1], self.direction)

    def __call__(self, records, texts, rows, step) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        try:
            total, per_fn = rl_rewards.score_rule_rewards(self.specs, records, list(texts), step)
        except DataError as e:
            raise TrainingError(f"step {step}: {e}; the step is refused, nothing saved") from None
        total, per_fn = np.asarray(total, np.float32), {k: np.asarray(v) for k, v in per_fn.items()}
        if self.model is not None:
            scores = rl_rewards.reward_model_scores(*self.model, rows, self.direction)
            if not np.isfinite(scores).all():
                raise TrainingError(
                    f"step {step}: {self.key}={self.path} gave a non-finite score (record "
                    f"{int(np.argmin(np.isfinite(scores)))}); the step is refused, nothing saved"
                )
            per_fn["reward_model"] = scores
            total = total + self.weight * scores
        return total, per_fn


def _recorded_tokenizer(workdir) -> str | None:
    from jaxalign.train import workdir as workdirs

    recorded = workdirs.read_config(workdir)
    return None if recorded is None else recorded.get("tokenizer")


def _rollout(
    run: Run,
    params,
    prompts: dict,
    key,
    options,
    scorer: Scorer,
    step: int,
    costs=None,
    respond=None,
):
    """Sample, score and lay out one prompt batch: (rows with "rewards" (and "costs" with a cost
    `Scorer`), per-reward values, the generation result). `respond(run, prompts, options, step)`
    (the family's, training only) may answer instead of the policy (a GenerateResult; None:
    sample)."""
    arrays = {k: prompts[k] for k in (*PROMPT_ARRAYS, "example_mask")}
    result = None if respond is None else respond(run, prompts, options, step)
    if result is None:
        result = sampling.generate(
            run.model_config,
            heads.decoder_params(params),
            arrays,
            rng=key,
            options=options,
            tokenizer=run.tokenizer,
            mesh=run.mesh,
            rules=run.rules,
        )
    records = [prompts["records"][i] for i in result.prompt_index]
    rows = rollout_rows(arrays, result, options.pad_id)
    # Empty slots at the end of a finite prompt file (no record) get reward 0, unscored.
    real = np.array([r is not None for r in records])
    picked = {k: v[real] for k, v in rows.items()}
    texts = [t for t, keep in zip(result.text, real, strict=True) if keep]
    scored, scored_fn = scorer([r for r in records if r is not None], texts, picked, step)
    rewards = np.zeros(len(records), np.float32)
    rewards[real] = scored
    per_fn = {}
    for name, values in scored_fn.items():
        per_fn[name] = np.zeros(len(records), np.float32)
        per_fn[name][real] = values
    rows = rows | {"rewards": rewards}
    if costs is not None:
        rows["costs"] = np.zeros(len(records), np.float32)
        rows["costs"][real] = costs([r for r in records if r is not None], texts, picked, step)[0]
    return rows, per_fn, result


def _pad_left(rows: dict, T: int) -> dict:
    """Rollout rows widened to T columns by left padding (prompt buckets differ)."""
    extra = T - rows["tokens"].shape[1]
    if not extra:
        return rows
    fill = {"seq_index": -1}
    return {
        k: np.pad(v, ((0, 0), (extra, 0)), constant_values=fill.get(k, 0)) if v.ndim == 2 else v
        for k, v in rows.items()
    }


def _all_hosts(x) -> np.ndarray:
    """A host array [n, ...] -> every host's, concatenated in process order (the global rows'
    order): what the rollout statistics and decisions are taken over."""
    x = np.asarray(x)
    return multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1 else x


def _informative(rewards: np.ndarray, G: int) -> np.ndarray:
    """[groups] whether a group's rewards differ (all equal: no learning signal)."""
    r = rewards.reshape(-1, G)
    return r.max(axis=1) > r.min(axis=1)


def rollout_step(run: Run, params, pipeline, key, options, scorer, step, costs=None):
    """One step's rollout: the next prompt batch sampled and scored (and its costs with a cost
    `Scorer`); with `rl.dynamic_sampling`
    (DAPO) groups whose rewards are all equal are replaced by informative groups of up to that
    many further prompt batches (fixed shapes: as many groups as one batch; groups still equal
    when the rounds run out are kept). Returns rows, per-reward values, results, statistics."""
    G = run.config.rl.group_size
    respond = run.family.respond
    rows, per_fn, result = _rollout(
        run, params, next(pipeline), key, options, scorer, step, costs, respond
    )
    stats = {"frac_reward_zero_std": 1.0 - _informative(_all_hosts(rows["rewards"]), G).mean()}
    rounds = run.config.rl.dynamic_sampling
    for extra in range(rounds):
        keep = _informative(rows["rewards"], G)
        if _all_hosts(keep).all():  # every host samples as many rounds (generate is collective)
            break
        more, more_fn, more_result = _rollout(
            run,
            params,
            next(pipeline),
            jax.random.fold_in(key, extra + 1),
            options,
            scorer,
            step,
            costs,
            respond,
        )
        useful = np.nonzero(_informative(more["rewards"], G))[0]
        slots = np.nonzero(~keep)[0][: len(useful)]
        if not len(slots):
            continue
        T = max(rows["tokens"].shape[1], more["tokens"].shape[1])
        rows, more = _pad_left(rows, T), _pad_left(more, T)
        take = np.concatenate([np.arange(g * G, (g + 1) * G) for g in useful[: len(slots)]])
        put = np.concatenate([np.arange(g * G, (g + 1) * G) for g in slots])
        for k in rows:
            rows[k][put] = more[k][take]
        for k in per_fn:
            per_fn[k][put] = more_fn[k][take]
        for field in ("lengths", "finish_reason"):
            getattr(result, field)[put] = getattr(more_result, field)[take]
        stats["dynamic_sampling/rounds"] = extra + 1
    kept = _informative(_all_hosts(rows["rewards"]), G)
    stats["dynamic_sampling/frac_kept_zero_std"] = 1.0 - kept.mean()
    return rows, per_fn, result, stats


def rollout_metrics(rows, per_fn, result, G: int) -> dict[str, float]:
    """Reward and completion statistics of a rollout (all hosts' rows), named as TRL / verl users
    expect."""
    rewards = _all_hosts(rows["rewards"]).reshape(-1, G)
    out = {
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.std(axis=1, ddof=1).mean()) if G > 1 else 0.0,
        "completions/mean_length": float(np.mean(_all_hosts(result.lengths))),
        "completions/clipped_ratio": float(np.mean(_all_hosts(result.finish_reason == "length"))),
    }
    out |= {f"rewards/{name}": float(np.mean(_all_hosts(v))) for name, v in per_fn.items()}
    if "costs" in rows:
        out["cost"] = float(np.mean(_all_hosts(rows["costs"])))
    return out


def _minibatches(run: Run, batch, key, take):
    """The update's minibatches: `rl.epochs` passes over them. A list (pair and SFT batches of
    online_dpo and rft) is used in order; rollout rows are split into `rl.minibatches` by a fresh
    permutation per pass (the rows in order with one minibatch and one pass), each stacked into
    `optimizer.grad_accum` micro-batches, rows sharded."""
    rl, accum = run.config.rl, run.config.optimizer.grad_accum
    if isinstance(batch, list):
        for _ in range(rl.epochs):
            yield from batch
        return
    R = batch["example_mask"].shape[0]
    if R % (rl.minibatches * accum):
        raise ConfigError(
            f"{R} rollout rows do not split into rl.minibatches={rl.minibatches} x "
            f"optimizer.grad_accum={accum}"
        )
    size = R // rl.minibatches
    shuffle = rl.epochs > 1 or rl.minibatches > 1
    for epoch in range(rl.epochs):
        order = np.arange(R)
        if shuffle:
            order = np.asarray(jax.random.permutation(jax.random.fold_in(key, 1000 + epoch), R))
        for m in range(rl.minibatches):
            yield take(batch, jnp.asarray(order[m * size : (m + 1) * size]))


def _take(run: Run):
    """Jitted (batch [R, ...], row indices) -> [A, rows / A, ...], rows over the batch axes."""
    accum = run.config.optimizer.grad_accum

    def take(batch, index):
        def one(x):
            picked = x[index]
            stacked = picked.reshape(accum, -1, *picked.shape[1:])
            spec = P(None, *sharding.batch_spec(run.rules, stacked.ndim - 1))
            return jax.lax.with_sharding_constraint(stacked, NamedSharding(run.mesh, spec))

        return jax.tree.map(one, batch)

    return jax.jit(take)


def make_evaluator(run: Run, scorer: Scorer, workdir: pathlib.Path, costs=None):
    """`evaluate(params, step) -> {reward/greedy, reward/sampled, rewards/<fn>/...}` on
    `data.eval`'s prompts (at most `eval_batches` batches), None without an eval file; with a
    cost `Scorer` also {cost/greedy, cost/sampled}.

    Each prompt is answered greedily once and sampled `rl.eval_samples` times at
    `rl.temperature`; its sampled score is the mean of its samples' rewards. The evaluation keys
    depend on the batch only, so every evaluation of a run draws the same random bits. The
    per-prompt scores go to WORKDIR/eval/step_N.json (`{"reward/greedy": [P], "reward/sampled":
    [P], "rewards/<fn>/greedy": [P], ...}`, prompts in file order): two evaluations of a run give
    a paired difference (`paired_difference`)."""
    config = run.config
    n = config.rl.eval_samples
    if n < 1:
        raise ConfigError(f"rl.eval_samples={n}: expected a number of completions >= 1")
    modes = (
        ("greedy", sampling_options(run, greedy=True, n=1)),
        ("sampled", sampling_options(run, n=n)),
    )

    def evaluate(params, step: int) -> dict | None:
        if not config.data.eval:
            return None
        values: dict[str, list] = {}
        prompts_batches = run.family.batches(run, config.data.eval, train=False)
        for i, prompts in enumerate(prompts_batches):
            if config.eval_batches and i >= config.eval_batches:
                break
            real = np.asarray(prompts["example_mask"]) > 0
            for name, options in modes:
                key = jax.random.fold_in(jax.random.key(config.seed + 1), i)
                rows, per_fn, result = _rollout(
                    run, params, prompts, key, options, scorer, step, costs
                )
                per_prompt = {  # [B * n] -> [real prompts], the mean of each prompt's samples
                    f"reward/{name}": rows["rewards"],
                    f"completions/mean_length/{name}": result.lengths,
                } | {f"rewards/{fn}/{name}": v for fn, v in per_fn.items()}
                if costs is not None:
                    per_prompt[f"cost/{name}"] = rows["costs"]
                for k, v in per_prompt.items():
                    v = np.asarray(v, np.float64).reshape(-1, options.n).mean(axis=1)[real]
                    values.setdefault(k, []).extend(v)
        if jax.process_index() == 0:
            scores = {
                k: [float(x) for x in v]
                for k, v in values.items()
                if k.startswith(("reward/", "rewards/", "cost/"))
            }
            (workdir / "eval").mkdir(exist_ok=True)
            write_atomic(workdir / "eval" / f"step_{step}.json", json.dumps(scores))
        return {k: float(np.mean(v)) for k, v in values.items()}

    return evaluate


def safety_batches(run: Run) -> list[dict]:
    """The safety test's held-out prompt batches: enough of `rl.safety.prompts` (else
    `data.eval`) for `rl.safety.n` prompts, read when the run starts, so a short file is refused
    before any training."""
    safety = run.config.rl.safety
    path = safety.prompts or run.config.data.eval
    batches, count = [], 0
    for prompts in run.family.batches(run, path, train=False):
        batches.append(prompts)
        count += int((_all_hosts(prompts["example_mask"]) > 0).sum())
        if count >= safety.n:
            return batches
    raise ConfigError(
        f"rl.safety.n={safety.n}: {path} holds {count} prompts; the safety test samples one "
        "completion on each of n held-out prompts"
    )


def safety_test(run: Run, params, batches, scorer: Scorer, costs: Scorer, writer) -> dict:
    """HC-RLHF's safety test of the trained policy (`jaxalign.rl.constrained.safety_test`): one
    completion sampled at `rl.temperature` on each of the `rl.safety.n` held-out prompts of
    `batches` (`safety_batches`) and its cost scored; passed when the (1 - delta) Student-t upper
    confidence bound on the mean cost is <= tau, else "no solution": the policy should not be
    deployed (its checkpoint is written all the same). Returns {passed, ucb, tau, n, delta,
    cost, reward} (the last two: the means over the n completions)."""
    config, safety = run.config, run.config.rl.safety
    options = sampling_options(run, n=1)
    got = {"costs": [], "rewards": []}
    for i, prompts in enumerate(batches):
        key = jax.random.fold_in(jax.random.key(config.seed + 2), i)
        rows, _, _ = _rollout(run, params, prompts, key, options, scorer, config.steps, costs)
        real = _all_hosts(rows["example_mask"]) > 0
        for k, values in got.items():
            values.extend(_all_hosts(rows[k])[real])
    sample = {k: np.asarray(v[: safety.n], np.float64) for k, v in got.items()}
    passed, ucb = constrained.safety_test(sample["costs"], tau=safety.tau, delta=safety.delta)
    result = {
        "passed": bool(passed),
        "ucb": float(ucb),
        "tau": float(safety.tau),
        "n": int(safety.n),
        "delta": float(safety.delta),
        "cost": float(sample["costs"].mean()),
        "reward": float(sample["rewards"].mean()),
    }
    verdict = "passed" if passed else "no solution (do not deploy this policy)"
    writer.print(
        f"safety test: upper {1 - safety.delta:.0%} bound on the mean cost {result['ucb']:.4f} "
        f"{'<=' if passed else '>'} tau {safety.tau:g} over {safety.n} held-out prompts: {verdict}"
    )
    return result


def paired_difference(
    before: Float[ArrayLike, " P"], after: Float[ArrayLike, " P"]
) -> tuple[float, float]:
    """The mean and standard error of per-prompt differences d = after - before of two
    evaluations on the same P prompts: (mean d, std(d) / sqrt(P)), std with ddof=1."""
    d = np.asarray(after, np.float64) - np.asarray(before, np.float64)
    if d.ndim != 1 or d.size < 2:
        raise ValueError(f"paired_difference: expected two [P] arrays with P >= 2, got {d.shape}")
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size))


def train(
    config: ConfigDict, workdir: str | pathlib.Path, *, allow_config_change: bool = False
) -> dict:
    """Run (or resume) an online RL family; returns the run's summary (`summary.json`)."""
    with session(config, workdir, allow_config_change=allow_config_change) as s:
        return s.finished if s.finished is not None else _loop(s)


def _loop(s: Session) -> dict:
    run, config, rl = s.run, s.run.config, s.run.config.rl
    state, ref_params, writer, stop = s.state, s.ref_params, s.writer, s.stop
    scorer = Scorer(run)
    costs = Scorer(run, costs=True) if run.family.constrained else None
    safety = safety_batches(run) if run.family.constrained else None
    options = sampling_options(run)
    to_batch = run.family.to_batch(run)
    train_step = run.jit_train_step()
    take = _take(run)
    evaluate = make_evaluator(run, scorer, s.workdir, costs)
    last_train, last_eval, saved = {}, None, None
    started, total_tokens = time.perf_counter(), 0.0
    if s.first == 0 and config.data.eval:
        last_eval = evaluate(run.policy_params(state["params"], ref_params), 0)
        writer.write(0, last_eval, split="eval")
    if stop:
        writer.print(f"{stop.name} received before training started; exiting")
    for step in range(s.first, s.first if stop else config.steps):
        key = jax.random.fold_in(jax.random.key(config.seed), step)
        tick = time.perf_counter()
        policy = run.policy_params(state["params"], ref_params)  # LoRA: base + adapters
        rows, per_fn, result, stats = rollout_step(
            run, policy, s.pipeline, key, options, scorer, step, costs
        )
        generated = float(np.sum(_all_hosts(result.lengths)))
        batch, prepared, rl_state = to_batch(state, ref_params, rows)
        jax.block_until_ready(batch)  # the rollout's time includes its log-prob forwards
        rollout_s = time.perf_counter() - tick
        # The train step donates what it updates (step, params, optimizer); the loop's own state
        # (KL coefficient, reward statistics) stays out of it.
        updated, updates = {k: v for k, v in state.items() if k != "rl"}, []
        for minibatch in _minibatches(run, batch, key, take):
            updated, metrics = train_step(updated, ref_params, minibatch)
            updates.append(metrics)
        state = updated | {"rl": rl_state}
        metrics = jax.tree.map(lambda *x: jnp.mean(jnp.stack(x)), *updates)
        writer.advance()
        done = step + 1
        total_tokens += generated
        if done % config.log_every == 0 or done == config.steps:
            check_finite(metrics, done, config, s.manager, s.workdir)
            update_s = time.perf_counter() - tick - rollout_s
            metrics = dict(metrics) | dict(jax.device_get(prepared)) | stats
            metrics |= rollout_metrics(rows, per_fn, result, rl.group_size)
            metrics |= {
                "time/rollout_s": rollout_s,
                "time/update_s": update_s,
                "rollout_tokens_per_s": generated / max(rollout_s, 1e-9),
            }
            last_train = writer.write(done, metrics)
        if config.eval_every and done % config.eval_every == 0 and done < config.steps:
            policy = run.policy_params(state["params"], ref_params)
            writer.write(done, evaluate(policy, done) or {}, split="eval")
        if checkpoint_due(config, done, bool(stop)):
            check_finite(metrics, done, config, s.manager, s.workdir)
            ckpt.save(s.manager, done, state, s.pipeline.get_state(), s.record)
            saved = done
        if stop:
            writer.print(f"step {done}: {stop.name} received; checkpoint saved, exiting")
            break
    if not stop and config.data.eval:
        last_eval = evaluate(run.policy_params(state["params"], ref_params), config.steps)
        writer.write(config.steps, last_eval, split="eval")
    extra = {}
    if safety is not None and not stop:
        policy = run.policy_params(state["params"], ref_params)
        extra["safety"] = safety_test(run, policy, safety, scorer, costs, writer)
        if jax.process_index() == 0:
            write_atomic(s.workdir / "safety.json", json.dumps(extra["safety"], indent=1))
    return s.finish(
        saved=saved,
        wall=time.perf_counter() - started,
        tokens=total_tokens,
        train=last_train,
        eval=last_eval,
        **extra,
    )
