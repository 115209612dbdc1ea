"""Distillation from a teacher model: GKD (Agarwal et al., 2024, "On-Policy Distillation of
Language Models"), the `gkd` trainer family.

Per step, the prompts of a batch of `{prompt, completion}` records get responses either sampled
by the student (on-policy, with probability `distill.lmbda`, the decision drawn per step from
`seed` and the step so a resumed run repeats it) or the records' own completions; the student
then minimises, per response token, the generalised Jensen-Shannon divergence to the teacher
over the full vocabulary,

    loss = sum_t mask_t JSD_b(p_T(. | x, y_<t), p_S(. | x, y_<t)) / sum_t mask_t   (token mean),
    JSD_b(p_T, p_S) = b KL(p_T || m) + (1 - b) KL(p_S || m),   m = b p_T + (1 - b) p_S,

both distributions at `distill.temperature` (`jaxalign.kernels.token_jsd`, never [B, T, V]).
b = `distill.beta`: 0 the forward KL(p_T || p_S) (supervised KD on the responses), 1 the reverse
KL(p_S || p_T). The paper's "student data fraction" lambda is TRL's `lmbda`: one draw per
batch (TRL: per training step), lmbda = 0 supervised KD / sequence-level KD on the data, 1 fully
on-policy. No gradient flows through the sampling.

The teacher (`distill.teacher`) is a second frozen model held as the step's `ref_params`: a
preset ("preset:NAME", random init from seed + 1), a run ("checkpoint:DIR") or a Hugging Face
directory ("hf:DIR"); its width and depth may differ from the student's, its vocabulary may not.

ADPA (Gao et al., 2025, "Advantage-Guided Distillation for Preference Alignment in Small Language
Models"), the `adpa` trainer family: on pair records, DPO on the student plus a token-level
regression of the student's log-ratio log pi - log pi_ref onto the teacher's advantage
log p_T - log p_Tref on the chosen and rejected tokens (`jaxalign.losses.adpa`). It holds three
frozen models: the student's reference, the teacher (`distill.teacher`) and the teacher's own
reference (`distill.teacher_ref`, a preset initialised from seed + 2), as {"ref", "teacher",
"teacher_ref"} in `ref_params`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import kernels, losses, models
from jaxalign.data import formats
from jaxalign.data.layout import BatchSpec
from jaxalign.data.templates import get_template
from jaxalign.errors import ConfigError
from jaxalign.sampling.result import GenerateResult
from jaxalign.train import objectives
from jaxalign.train.objectives import Objective, Teacher

ON_POLICY_STREAM = 0x474B44  # "GKD": the per-step on-policy draws


def teacher(spec: str, student: models.ModelConfig, key: str = "distill.teacher") -> Teacher:
    """The spec's architecture and weight source; ConfigErrors name the key (`distill.teacher`,
    ADPA's `distill.teacher_ref`)."""
    kind, _, where = spec.partition(":")
    if kind not in ("preset", "checkpoint", "hf") or not where:
        raise ConfigError(f'{key}="{spec}": expected "preset:NAME", "checkpoint:DIR" or "hf:DIR"')
    if kind == "preset":
        if where not in models.PRESETS:
            known = ", ".join(sorted(models.PRESETS))
            raise ConfigError(f'{key}="{spec}": unknown preset (known: {known})')
        config, source = models.get_preset(where), ""
    else:
        from jaxalign.train.reference import architecture

        try:
            config, source = architecture(spec), spec
        except (OSError, ValueError) as e:
            raise ConfigError(f'{key}="{spec}": {e}') from None
        if kind == "checkpoint":
            config = config.replace(dtype="float32", param_dtype="float32", lora=None)
    if config.vocab_size != student.vocab_size:
        raise ConfigError(
            f'{key}="{spec}": vocabulary {config.vocab_size}, the student\'s is '
            f"{student.vocab_size}; the JSD compares distributions over one vocabulary"
        )
    for who, mc in (("teacher", config), ("student", student)):
        if mc.final_logit_softcap:
            raise ConfigError(
                f"distill: the {who} soft-caps its logits (final_logit_softcap="
                f"{mc.final_logit_softcap}); token_jsd has no soft-cap"
            )
    return Teacher(config, source)


def gkd_objective(
    model_config,
    teacher: Teacher,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mesh=None,
    rules=None,
    implementation: str | None = None,
) -> Objective:
    """Token-mean JSD_b(teacher, student) on rollout rows (`jaxalign.rl.rollout` layout), the
    teacher as `ref_params`. Metrics: `distill/jsd` (the loss) and `distill/teacher_nll`, the
    teacher's token-mean NLL of the responses (how teacher-like they are)."""
    tc = teacher.model_config

    def fn(params, teacher_params, micro, loss_state=None):
        del loss_state

        def hidden(mc, p):
            return models.forward(
                mc,
                p,
                micro["tokens"],
                micro["positions"],
                micro["segment_ids"],
                mesh=mesh,
                rules=rules,
            )

        mask = micro["loss_mask"] * micro["example_mask"][:, None]
        hidden_t = jax.lax.stop_gradient(hidden(tc, teacher_params))
        w_t = jax.lax.stop_gradient(models.unembedding(tc, teacher_params))
        jsd = kernels.token_jsd(
            hidden(model_config, params),
            models.unembedding(model_config, params),
            hidden_t,
            w_t,
            beta=beta,
            temperature=temperature,
            mask=mask > 0,
            implementation=implementation,
        )
        teacher_logps = kernels.token_logprobs(hidden_t, w_t, micro["targets"], mask=mask > 0)
        loss_sum = (jsd * mask).sum()
        metrics = {"distill/jsd": loss_sum, "distill/teacher_nll": -(teacher_logps * mask).sum()}
        return loss_sum, mask.sum(), metrics

    return Objective(fn, BatchSpec("rollout"), needs_ref=True, teacher=teacher)


def adpa_objective(
    model_config,
    teacher: Teacher,
    teacher_ref: Teacher,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    num_groups: int = 1,
    mesh=None,
    rules=None,
    implementation: str | None = None,
) -> Objective:
    """ADPA (`jaxalign.losses.adpa`) on pair batches: per-token log-probs of the data's tokens
    under the student, its reference, the teacher and the teacher's reference (each by
    `jaxalign.kernels.token_logprobs`, no [B, T, V] logits); `ref_params` is {"ref", "teacher",
    "teacher_ref"}, all frozen. Pair-weighted mean of the per-pair loss."""

    def fn(params, frozen, micro, loss_state=None):
        del loss_state
        P = micro["example_mask"].shape[0]
        index, total = objectives.sequence_index(micro, 2 * P // num_groups, num_groups)

        def logps(mc, p):
            return objectives.token_logps(
                mc, p, micro, mesh=mesh, rules=rules, implementation=implementation
            )

        frozen = jax.lax.stop_gradient(frozen)
        loss, metrics = losses.adpa(
            logps(model_config, params),
            logps(model_config, frozen["ref"]),
            logps(teacher.model_config, frozen["teacher"]),
            logps(teacher_ref.model_config, frozen["teacher_ref"]),
            micro["loss_mask"],
            index,
            num_pairs=P,
            num_groups=num_groups,
            beta=beta,
            alpha=alpha,
        )
        weight = micro["example_mask"]
        return (loss * weight).sum(), weight.sum(), objectives.weighted(metrics, weight)

    return Objective(
        fn, BatchSpec("pair"), needs_ref=True, teacher=teacher, teacher_ref=teacher_ref
    )


def on_policy(seed: int, step: int, lmbda: float) -> bool:
    """Whether step `step`'s responses are the student's samples: a uniform draw from (seed,
    step) below `lmbda` (the same on every host and on resume)."""
    return bool(np.random.default_rng([seed, step, ON_POLICY_STREAM]).random() < lmbda)


def data_responses(run, prompts: dict, options, step: int) -> GenerateResult | None:
    """The family's `respond`: None (sample) on on-policy steps, else the records' completions
    as a `GenerateResult` (n copies per prompt, tokenised as SFT tokenises them, cut to
    `rl.max_new_tokens`; the EOS that ends them included)."""
    config = run.config
    if on_policy(config.seed, step, config.distill.lmbda):
        return None
    tok, n, M = run.tokenizer, options.n, options.max_new_tokens
    template = get_template(config.data.template, tok)
    records = prompts["records"]
    tokens = np.full((len(records), M), options.pad_id, np.int32)
    lengths = np.zeros(len(records), np.int32)
    finish = np.full(len(records), "stop", object)
    texts = [""] * len(records)
    for i, record in enumerate(records):
        if record is None:  # an empty slot at the end of a finite file
            continue
        example = formats.parse_sft(record)
        max_prompt_len = config.data.max_prompt_len
        ids, prompt_len, _ = formats.tokenize_example(
            tok,
            template,
            example["messages"],
            example["system"],
            example["responses"][0],
            max_len=max_prompt_len + M,
            max_prompt_len=max_prompt_len,
        )
        response = ids[prompt_len:]
        lengths[i] = min(len(response), M)
        tokens[i, : lengths[i]] = response[:M]
        finish[i] = "length" if len(response) > M else "stop"
        texts[i] = example["responses"][0]
    rows = np.repeat(np.arange(len(records)), n)
    return GenerateResult(
        tokens=tokens[rows],
        lengths=lengths[rows],
        finish_reason=finish[rows],
        logprobs=np.zeros((len(rows), M), np.float32),
        policy_logprobs=np.zeros((len(rows), M), np.float32),
        prompt_index=rows.astype(np.int32),
        text=np.asarray([texts[r] for r in rows], object),
    )


def rollout_batch(run):
    """`to_batch` for gkd: the rollout rows as they are (the teacher runs inside the step)."""
    keys = ("tokens", "targets", "loss_mask", "positions", "segment_ids", "seq_index")

    config = run.config
    updates_per_step = config.rl.epochs * config.rl.minibatches

    def to_batch(state, ref_params, rows):
        host = {k: rows[k] for k in (*keys, "example_mask")}
        batch = jax.tree.map(lambda x: x[0], run.global_batch([host]))
        step = int(state["step"]) // updates_per_step
        sampled = on_policy(config.seed, step, config.distill.lmbda)
        return batch, {"distill/on_policy": jnp.float32(sampled)}, state["rl"]

    return to_batch
