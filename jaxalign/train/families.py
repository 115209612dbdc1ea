"""Trainer families: one record each, read by the loops, the compile-only plan and the reference
cache. Nothing else chooses by the family's name.

| `trainer`  | objective                     | records              | head          | loop    |
|------------|-------------------------------|----------------------|---------------|---------|
| `sft`      | token-mean NLL                | sft                  |               | offline |
| `paired`   | any paired loss or mix        | pair                 |               | offline |
| `unpaired` | kto / bco / npo (+ retain)    | unpaired (kto, bco), |               | offline |
|            |                               | sft (npo forget set) |               |         |
| `reward`   | Bradley-Terry reward model    | pair                 | `reward_head` | offline |
| `reward_multi` | k-objective MSE reward model | ratings          | `reward_head` | offline |
| `cut`      | CUT: unlikelihood on flagged tokens, NLL elsewhere | judgment |     | offline |
| `ppo`      | clipped PG + value loss, GAE  | prompts              | `value_head`  | online  |
| `grpo`     | clipped PG, group advantages  | prompts              |               | online  |
| `rloo`     | clipped PG, leave-one-out     | prompts              |               | online  |
| `reinforce_pp` | clipped PG, REINFORCE++   | prompts              |               | online  |
| `online_dpo` | any paired loss on (best, worst) of a group | prompts |            | online  |
| `rft`      | SFT on each group's best      | prompts              |               | online  |
| `hc_rlhf`  | clipped PG, leave-one-out of  | prompts              |               | online  |
|            | r - lambda cost, safety test  |                      |               |         |
| `spa`      | any paired loss on pairs the policy's implicit reward labels | prompts |  | online |
| `gkd`      | JSD_b to a teacher, per token | sft (prompt, completion) |           | online  |
| `adpa`     | DPO + student log-ratio onto  | pair                 |               | offline |
|            | the teacher's advantage       |                      |               |         |

`trainer="dpo"` is an alias of `paired` (it runs any paired loss, not only DPO).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import pathlib
from collections.abc import Callable

import jax
from ml_collections import ConfigDict

from jaxalign import losses
from jaxalign.data import (
    formats,
    layout,
    make_batches,
    make_direction_system,
    make_prompt_pipeline,
    make_ref_join,
)
from jaxalign.errors import ConfigError
from jaxalign.losses import policy as policy_losses
from jaxalign.models import heads
from jaxalign.sharding import ShardingRules
from jaxalign.train import distill, objectives, policy, reference, reward, updates
from jaxalign.train.objectives import Objective


@dataclasses.dataclass(frozen=True)
class Family:
    """Everything that differs between trainer families.

    objective: (config, model_config, mesh) -> Objective (its `batch` is the batch spec).
    batches: (run, path, *, train) -> the batch iterator of one split (prompt batches for the
      online families).
    head: the name of a head in the params tree (`jaxalign.models.heads`), or None.
    head_outputs: (config) -> k, the head's outputs (1 when None).
    takes_ref_cache: `data.ref_logps` (`jaxalign cache-ref`) applies.
    ref_cache_fields: the batch fields the reference cache fills (pairs: `CACHE_FIELDS`; single
      responses: `SINGLE_CACHE_FIELDS`).
    loop: which loop runs it ("offline": one batch, one update; "online": sample, score,
      update, `jaxalign.train.online`).
    to_batch: online families: (run) -> the rollout-to-update-batch function
      (`jaxalign.train.updates`).
    constrained: the family trains under a cost constraint (`jaxalign.rl.constrained`): costs
      are scored (`rl.costs`, `rl.cost_model`), the multiplier is loop state, and the safety
      test runs after training.
    respond: online families: (run, prompts, options, step) -> the training rollout's responses
      (a `GenerateResult`) in place of the policy's samples, or None to sample (gkd's data
      responses).
    """

    objective: Callable[..., Objective]
    batches: Callable
    head: str | None = None
    head_outputs: Callable[[ConfigDict], int] | None = None
    takes_ref_cache: bool = False
    ref_cache_fields: tuple[str, ...] = layout.CACHE_FIELDS
    loop: str = "offline"
    to_batch: Callable | None = None
    constrained: bool = False
    respond: Callable | None = None


def make_loss(config: ConfigDict) -> losses.Bound | losses.Mix:
    """The configured loss, its hyperparameters checked against the loss's signature.

    `loss.name` a name in `jaxalign.losses.names()`, the other `loss.*` keys its hyperparameters;
    or `loss.name = "mix"` with `loss.terms` a tuple of `(name, weight[, hyper[, rename]])`, e.g.
    MPO: `(("dpo", 0.8, {"beta": 0.1}), ("bco_pair", 0.2, {}), ("sft", 1.0, {}))`: loss =
    sum_k weight_k loss_k (`jaxalign.losses.mix`)."""
    loss = config.loss.to_dict()
    name = loss.pop("name")
    try:
        if name != "mix":
            return losses.bind(name, **loss)
        terms = loss.pop("terms", ())
        if loss or not terms:
            raise ValueError(
                f"a mix takes `loss.terms` (name, weight[, hyper[, rename]]) only, got "
                f"terms={terms!r} and {sorted(loss)}"
            )
        return losses.mix([tuple(t) for t in terms])
    except (KeyError, TypeError, ValueError) as e:
        message = str(e.args[0] if e.args else e).removeprefix("jaxalign: ")
        raise ConfigError(
            message if message.startswith("unknown loss") else f"loss {name!r}: {message}"
        ) from None


def ref_cache_settings(config: ConfigDict) -> dict:
    """What cached reference log-probs depend on; the join checks them against the cache's."""
    return {
        "tokenizer": config.tokenizer,
        "template": config.data.template,
        "max_len": config.data.max_len,
        "max_prompt_len": config.data.max_prompt_len,
        "train_on_prompt": config.data.train_on_prompt,
        "reference": (
            "soup " + " ".join(config.reference.soup)
            if config.reference.soup
            else config.model.init_from or f"{config.model.preset} seed={config.seed}"
        ),
    }


@functools.lru_cache(maxsize=2)
def _ref_join_cached(path: str, mtime: float, settings_json: str, fields: tuple[str, ...]):
    return make_ref_join(path, json.loads(settings_json), fields)


def ref_join(config: ConfigDict):
    """The reference-cache join transform of `data.ref_logps`, loaded once per file version
    (evaluations rebuild pipelines)."""
    path = config.data.ref_logps
    mtime = pathlib.Path(path).stat().st_mtime if pathlib.Path(path).exists() else 0.0
    settings = json.dumps(ref_cache_settings(config), sort_keys=True)
    return _ref_join_cached(path, mtime, settings, get(config.trainer).ref_cache_fields)


def _fields(config: ConfigDict) -> tuple[str, ...]:
    """The per-example data fields of a batch: `data.extra_fields`, and the reference cache's."""
    cached = get(config.trainer).ref_cache_fields if config.data.ref_logps else ()
    return (*config.data.extra_fields, *cached)


def _with_loss(make, config: ConfigDict, model_config, **kw) -> Objective:
    """`make(model_config, loss, num_groups=..., fields=..., **kw)` with the configured loss; a
    loss the objective cannot carry is a ConfigError."""
    try:
        return make(
            model_config,
            make_loss(config),
            num_groups=jax.process_count(),
            fields=_fields(config),
            **kw,
        )
    except ValueError as e:
        raise ConfigError(f"loss: {e}") from None


def _placement(config: ConfigDict, mesh) -> dict:
    """Where the objective runs: the mesh (for the sharded log-prob kernel), the sharding rules
    (activation annotations) and the log-prob kernel implementation."""
    impl = None if config.logprob_impl == "auto" else config.logprob_impl
    return {"mesh": mesh, "rules": ShardingRules.preset(config.sharding), "implementation": impl}


def sft(config: ConfigDict, model_config, mesh) -> Objective:
    return objectives.sft_objective(
        model_config,
        num_groups=jax.process_count(),
        fields=_fields(config),
        **_placement(config, mesh),
    )


def paired(config: ConfigDict, model_config, mesh) -> Objective:
    return _with_loss(
        objectives.paired_objective,
        config,
        model_config,
        num_samples=config.data.num_samples,
        num_correct=config.data.num_correct,
        num_incorrect=config.data.num_incorrect,
        **_placement(config, mesh),
    )


def unpaired(config: ConfigDict, model_config, mesh) -> Objective:
    return _with_loss(
        objectives.unpaired_objective,
        config,
        model_config,
        retain=bool(config.data.retain),
        **_placement(config, mesh),
    )


def cut(config: ConfigDict, model_config, mesh) -> Objective:
    return _with_loss(
        objectives.judgment_objective, config, model_config, **_placement(config, mesh)
    )


def reward_model(config: ConfigDict, model_config, mesh) -> Objective:
    del mesh  # the reward head reads hidden states; no log-prob kernel
    if config.reward.num_objectives != 1:
        raise ConfigError(
            f"reward.num_objectives={config.reward.num_objectives}: trainer reward trains a "
            "Bradley-Terry scalar reward on pairs; a k-objective model is trainer reward_multi"
        )
    return _with_loss(reward.reward_objective, config, model_config)


def num_objectives(config: ConfigDict) -> int:
    k = config.reward.num_objectives
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"reward.num_objectives={k!r}: expected an int >= 1")
    return k


def reward_multi(config: ConfigDict, model_config, mesh) -> Objective:
    del mesh  # the reward head reads hidden states; no log-prob kernel
    return _with_loss(
        reward.ratings_objective, config, model_config, num_ratings=num_objectives(config)
    )


def record_transforms(config: ConfigDict) -> tuple:
    """The configured record transforms: DPA's direction system message when
    `data.direction_objectives` is set (`jaxalign.data.transforms.direction_system`)."""
    data = config.data
    if not data.direction_objectives:
        return ()
    if "{weighted}" not in data.direction_template:
        raise ConfigError(
            f"data.direction_template {data.direction_template!r} has no {{weighted}} field"
        )
    return (
        make_direction_system(
            objectives=tuple(data.direction_objectives), template=data.direction_template
        ),
    )


def offline_batches(run, path: str, *, train: bool):
    """Batches of the objective's spec from `path` (`jaxalign.data.make_batches`): each host reads
    its share of every micro-batch of the global `data.batch_size`; the reference-cache join when
    `data.ref_logps` is set; endless for training, one pass otherwise."""
    config = run.config
    data = config.data
    spec = run.objective.batch
    transforms = record_transforms(config) + ((ref_join(config),) if data.ref_logps else ())
    return make_batches(
        spec,
        path,
        run.tokenizer,
        retain_path=data.retain,
        batch_size=data.batch_size // (config.optimizer.grad_accum * jax.process_count()),
        max_len=data.max_len,
        max_prompt_len=data.max_prompt_len,
        pack=data.pack,
        seed=data.shuffle_seed,
        template=data.template,
        skip_bad_records=data.skip_bad_records,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        train_on_prompt=data.train_on_prompt,
        transforms=transforms,
        num_epochs=None if train else 1,
    )


def prompt_batches(run, path: str, *, train: bool, transforms=()):
    """Prompt batches (`jaxalign.data.make_prompt_pipeline`) of the online families: each host
    reads its share of `data.batch_size` prompts; endless and shuffled for training, one pass in
    file order for evaluation. `transforms` as in `jaxalign.data.sources`."""
    data = run.config.data
    return make_prompt_pipeline(
        path,
        run.tokenizer,
        batch_size=data.batch_size // jax.process_count(),
        max_prompt_len=data.max_prompt_len,
        seed=data.shuffle_seed,
        shuffle=train,
        template=data.template,
        skip_bad_records=data.skip_bad_records,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        num_epochs=None if train else 1,
        transforms=(*record_transforms(run.config), *transforms),
    )


def _with_completion(record: dict) -> list[dict]:
    """gkd's records need a completion (the off-policy responses): a bad one is a DataError
    naming the file and line."""
    formats.parse_sft(record)
    return [record]


def gkd_batches(run, path: str, *, train: bool):
    """Prompt batches; the training records must carry a completion (evaluation samples)."""
    return prompt_batches(run, path, train=train, transforms=(_with_completion,) if train else ())


def gkd(config: ConfigDict, model_config, mesh) -> Objective:
    d = config.distill
    _splits(config, config.data.batch_size * config.rl.group_size, "gkd rollout rows")
    for key, value, ok, expected in (
        ("beta", d.beta, 0.0 <= d.beta <= 1.0, "0 <= beta <= 1"),
        ("lmbda", d.lmbda, 0.0 <= d.lmbda <= 1.0, "a fraction 0 <= lmbda <= 1"),
        ("temperature", d.temperature, d.temperature > 0, "> 0"),
    ):
        if not ok:
            raise ConfigError(f"distill.{key}={value}: expected {expected}")
    if config.lora.rank:
        raise ConfigError(
            f"lora.rank={config.lora.rank}: gkd holds the teacher where a LoRA run holds its "
            "base; distil with full fine-tuning"
        )
    place = _placement(config, mesh)
    return distill.gkd_objective(
        model_config,
        distill.teacher(config.distill.teacher, model_config),
        beta=d.beta,
        temperature=d.temperature,
        mesh=place["mesh"],
        rules=place["rules"],
        implementation="reference" if config.logprob_impl == "reference" else None,
    )


def adpa(config: ConfigDict, model_config, mesh) -> Objective:
    d = config.distill
    for key, value, ok, expected in (
        ("dpo_beta", d.dpo_beta, d.dpo_beta > 0, "> 0"),
        ("alpha", d.alpha, d.alpha >= 0, ">= 0 (0 = plain DPO)"),
    ):
        if not ok:
            raise ConfigError(f"distill.{key}={value}: expected {expected}")
    if config.lora.rank:
        raise ConfigError(
            f"lora.rank={config.lora.rank}: adpa holds two teachers and the student's reference "
            "where a LoRA run holds its base; train with full fine-tuning"
        )
    if reference.update_rule(config):
        raise ConfigError(
            f'reference.update="{reference.update_rule(config)}": adpa keeps the student\'s '
            "reference fixed"
        )
    if not d.teacher_ref:
        raise ConfigError(
            "distill.teacher_ref is empty: adpa needs the teacher's own reference (the model the "
            'teacher was aligned from), e.g. "checkpoint:DIR"'
        )
    place = _placement(config, mesh)
    return distill.adpa_objective(
        model_config,
        distill.teacher(d.teacher, model_config),
        distill.teacher(d.teacher_ref, model_config, key="distill.teacher_ref"),
        beta=d.dpo_beta,
        alpha=d.alpha,
        num_groups=jax.process_count(),
        **place,
    )


def _group_of_two(config: ConfigDict, family: str) -> None:
    if config.rl.group_size < 2:
        raise ConfigError(
            f"rl.group_size={config.rl.group_size}: {family} compares the completions of a "
            "prompt, so it needs at least 2"
        )


def _splits(config: ConfigDict, examples: int, what: str) -> None:
    """An update's examples per step must split into `rl.minibatches` x `optimizer.grad_accum`."""
    parts = config.rl.minibatches * config.optimizer.grad_accum
    if config.rl.minibatches < 1 or examples % parts:
        raise ConfigError(
            f"{what} = {examples} per step do not split into rl.minibatches="
            f"{config.rl.minibatches} x optimizer.grad_accum={config.optimizer.grad_accum}"
        )


def _grao_groups(config: ConfigDict, family: str) -> None:
    """GRAO's pairwise term (rl.pair_coef) compares the rows of one prompt: only grpo carries it,
    and the rows must stay in order (one minibatch, one epoch; a micro-batch of
    `optimizer.grad_accum` always holds whole prompts, since data.batch_size divides by it)."""
    rl = config.rl
    if family != "grpo":
        raise ConfigError(f"rl.pair_coef={rl.pair_coef}: GRAO's pairwise term is a grpo option")
    if rl.pair_coef < 0 or rl.pair_beta <= 0:
        raise ConfigError(
            f"rl.pair_coef={rl.pair_coef}, rl.pair_beta={rl.pair_beta}: expected >= 0 and > 0"
        )
    if rl.minibatches != 1 or rl.epochs != 1:
        raise ConfigError(
            f"rl.pair_coef={rl.pair_coef}: GRAO compares the {rl.group_size} rows of a prompt, so "
            f"it needs the rows in order: rl.minibatches=1 and rl.epochs=1 (got "
            f"minibatches={rl.minibatches}, epochs={rl.epochs}; micro-batches of "
            "optimizer.grad_accum hold whole prompts)"
        )


def _policy(*, kl_in_loss: bool, value_head: bool, family: str, compares: bool = False):
    def build(config: ConfigDict, model_config, mesh) -> Objective:
        if compares:
            _group_of_two(config, family)
        rows = config.data.batch_size * config.rl.group_size
        _splits(config, rows, "data.batch_size x rl.group_size rollout rows")
        if kl_in_loss and config.rl.kl_target > 0:
            raise ConfigError(
                f"rl.kl_target={config.rl.kl_target}: the adaptive KL coefficient shapes the KL "
                f"in the reward (ppo, rloo, reinforce_pp); {family}'s k3 loss term takes the "
                "fixed rl.kl_coef"
            )
        if config.rl.aggregation not in policy_losses.AGGREGATIONS:
            raise ConfigError(
                f'rl.aggregation "{config.rl.aggregation}" is unknown (known: '
                f"{', '.join(policy_losses.AGGREGATIONS)})"
            )
        if config.rl.ratio not in ("token", "sequence"):
            raise ConfigError(f'rl.ratio "{config.rl.ratio}": expected "token" or "sequence"')
        if config.rl.pair_coef:
            _grao_groups(config, family)
        place = _placement(config, mesh)
        return policy.policy_objective(
            model_config,
            config.rl,
            kl_in_loss=kl_in_loss,
            value_head=value_head,
            mesh=place["mesh"],
            rules=place["rules"],
            impl=place["implementation"],
        )

    return build


def online_dpo(config: ConfigDict, model_config, mesh) -> Objective:
    _group_of_two(config, config.trainer)  # online_dpo, spa
    _splits(config, config.data.batch_size, "data.batch_size pairs")
    return paired(config, model_config, mesh)


def rft(config: ConfigDict, model_config, mesh) -> Objective:
    _splits(config, config.data.batch_size, "data.batch_size best completions")
    return sft(config, model_config, mesh)


def _online(objective, estimator, *, kl_in_loss=False, head=None, constrained=False) -> Family:
    return Family(
        objective,
        prompt_batches,
        head=head,
        loop="online",
        to_batch=lambda run: updates.policy_batch(
            run, estimator, kl_in_loss=kl_in_loss, constrained=constrained
        ),
        constrained=constrained,
    )


FAMILIES: dict[str, Family] = {
    "sft": Family(sft, offline_batches),
    "paired": Family(paired, offline_batches, takes_ref_cache=True),
    "unpaired": Family(
        unpaired,
        offline_batches,
        takes_ref_cache=True,
        ref_cache_fields=layout.SINGLE_CACHE_FIELDS,
    ),
    "reward": Family(reward_model, offline_batches, head=heads.REWARD_HEAD),
    "reward_multi": Family(
        reward_multi, offline_batches, head=heads.REWARD_HEAD, head_outputs=num_objectives
    ),
    "cut": Family(cut, offline_batches),
    "ppo": _online(
        _policy(kl_in_loss=False, value_head=True, family="ppo"), None, head=heads.VALUE_HEAD
    ),
    "grpo": _online(
        _policy(kl_in_loss=True, value_head=False, family="grpo", compares=True),
        updates.grpo_advantages,
        kl_in_loss=True,
    ),
    "rloo": _online(
        _policy(kl_in_loss=False, value_head=False, family="rloo", compares=True),
        updates.rloo_advantages,
    ),
    "reinforce_pp": _online(
        _policy(kl_in_loss=False, value_head=False, family="reinforce_pp"),
        updates.reinforce_pp_advantages,
    ),
    "online_dpo": Family(online_dpo, prompt_batches, loop="online", to_batch=updates.pair_batch),
    "rft": Family(rft, prompt_batches, loop="online", to_batch=updates.best_batch),
    "hc_rlhf": _online(
        _policy(kl_in_loss=False, value_head=False, family="hc_rlhf", compares=True),
        updates.rloo_advantages,
        constrained=True,
    ),
    "spa": Family(online_dpo, prompt_batches, loop="online", to_batch=updates.spa_pair_batch),
    "adpa": Family(adpa, offline_batches),
    "gkd": Family(
        gkd,
        gkd_batches,
        loop="online",
        to_batch=distill.rollout_batch,
        respond=distill.data_responses,
    ),
}
ALIASES = {"dpo": "paired"}


def check_costs(config: ConfigDict, family: Family) -> None:
    """A constrained family (hc_rlhf) needs costs, held-out prompts for its safety test and sane
    `rl.safety` settings; the other families take no costs."""
    rl, trainer = config.rl, config.trainer
    has_costs = bool(rl.costs) or bool(rl.cost_model)
    if not family.constrained:
        if has_costs:
            raise ConfigError(
                f'rl.costs / rl.cost_model: trainer "{trainer}" trains no cost constraint '
                '(trainer "hc_rlhf" does)'
            )
        return
    safety = rl.safety
    problems = (
        (
            not has_costs,
            "no costs: set rl.costs (rule terms, rl.rewards syntax) or rl.cost_model (a reward-"
            "trainer run trained on cost pairs)",
        ),
        (
            not (safety.prompts or config.data.eval),
            "the safety test needs held-out prompts: set rl.safety.prompts or data.eval",
        ),
        (safety.n < 2, f"rl.safety.n={safety.n}: expected an int >= 2"),
        (
            not 0 < safety.delta < 1,
            f"rl.safety.delta={safety.delta}: expected 0 < delta < 1",
        ),
        (safety.c1 < 0, f"rl.safety.c1={safety.c1}: expected >= 0"),
        (safety.c2 < 0, f"rl.safety.c2={safety.c2}: expected >= 0"),
        (
            not safety.lambda_lr > 0,
            f"rl.safety.lambda_lr={safety.lambda_lr}: expected > 0",
        ),
    )
    for bad, message in problems:
        if bad:
            raise ConfigError(f"trainer {trainer}: {message}")


SELF_JUDGES = ("", "confidence", "consistency")


def check_self_judge(config: ConfigDict) -> None:
    """`rl.rft_self_judge` (self-alignment) is rft's: "confidence" thresholds a mean log-prob
    (<= 0), "consistency" a share of the group (in (0, 1]); other thresholds would keep nothing
    or everything."""
    rl = config.rl
    if rl.rft_self_judge not in SELF_JUDGES:
        raise ConfigError(
            f"rl.rft_self_judge={rl.rft_self_judge!r}; expected one of "
            + ", ".join(repr(j) for j in SELF_JUDGES)
        )
    if not rl.rft_self_judge:
        return
    if ALIASES.get(config.trainer, config.trainer) != "rft":
        raise ConfigError(
            f'rl.rft_self_judge: trainer "{config.trainer}" has no self-judged selection '
            '(trainer "rft" does)'
        )
    if rl.rft_self_judge == "confidence" and not rl.rft_min_reward <= 0:
        raise ConfigError(
            f"rl.rft_min_reward={rl.rft_min_reward} with rl.rft_self_judge='confidence': the "
            "self-judgment is a mean token log-prob (<= 0), expected a threshold <= 0 (e.g. -0.5)"
        )
    if rl.rft_self_judge == "consistency" and not 0 < rl.rft_min_reward <= 1:
        raise ConfigError(
            f"rl.rft_min_reward={rl.rft_min_reward} with rl.rft_self_judge='consistency': the "
            "self-judgment is a share of the group's samples, expected a threshold in (0, 1]"
        )


def get(name: str) -> Family:
    """The family a config's `trainer` names (aliases resolved); unknown names are ConfigErrors."""
    family = FAMILIES.get(ALIASES.get(name, name))
    if family is None:
        close = difflib.get_close_matches(name, [*FAMILIES, *ALIASES], n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        known = ", ".join([*FAMILIES, *(f"{a} (= {b})" for a, b in ALIASES.items())])
        raise ConfigError(f'trainer "{name}" is unknown{hint}; known: {known}')
    return family
