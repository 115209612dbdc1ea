"""Compile-only planning (`jaxalign train --compile_only [--topology ...]`)."""

import contextlib
import importlib.util
import io
import pathlib

import pytest

from jaxalign import cli, models
from jaxalign.config import apply_overrides, load_config
from jaxalign.errors import ConfigError
from jaxalign.train import setup
from jaxalign.train.plan import compile_plan, topology_name

ROOT = pathlib.Path(__file__).resolve().parents[2]
DPO = ROOT / "configs/dpo/tiny.py"
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _tiny(*overrides):
    config = load_config(f"{DPO}:smoke=True")
    return apply_overrides(config, ["data.batch_size=16", *overrides])


def _plan(*overrides):
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        plan = compile_plan(_tiny(*overrides))
    return plan, text.getvalue()


@pytest.fixture(scope="module")
def tiny_plan():
    """Scanned layers, as on an accelerator (on CPU "auto" unrolls them)."""
    return _plan("model.layer_loop=scan")


def test_unrolled_layers_are_counted_whole(tiny_plan):
    """Unrolled, XLA counts every layer itself; it agrees with the scanned plan's R0 + L (R_L -
    R0) (measured: 0.6% apart: the programs differ in fusion)."""
    scanned, (unrolled, _) = tiny_plan[0], _plan("model.layer_loop=unroll")
    assert unrolled["flops_outside_layers_per_device"] is None
    assert abs(unrolled["flops_per_step"] / scanned["flops_per_step"] - 1) < 0.02


def test_compile_only_prints_memory_and_flops(tiny_plan):
    _, out = tiny_plan
    for line in ("arguments", "outputs", "temporaries", "generated code", "total"):
        assert f"\n  {line}" in out
    assert "FLOPs/step" in out and "tokens/step" in out and "model params" in out
    assert "8 x cpu" in out and "fsdp=8" in out


def test_plan_numbers_are_consistent(tiny_plan):
    plan, _ = tiny_plan
    assert plan["devices"] == 8 and plan["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert plan["params"] == models.param_count(models.get_preset("tiny-64"))
    # Padded pairs at their longest: 2 x 16 rows of max_len tokens.
    assert plan["tokens_per_step"] == 2 * 16 * _tiny().data.max_len
    mem = plan["memory"]
    assert mem["arguments"] > 0 and mem["temporaries"] > 0
    # The step donates its state: the new state reuses the old one's buffers.
    assert 0 < mem["aliased"] <= mem["outputs"]
    parts = ("arguments", "outputs", "temporaries", "generated_code")
    assert mem["total"] == sum(mem[k] for k in parts) - mem["aliased"]
    # XLA counts a loop body once; the plan multiplies the layer loops back. 8N per token
    # (policy forward + backward, reference forward) without attention is a lower bound, and
    # the uncorrected count (one layer's worth of 2) falls below it.
    flops, model_flops = plan["flops_per_step"], plan["model_flops_per_step"]
    assert model_flops < flops < 1.5 * model_flops
    assert plan["flops_counted_per_device"] * 8 < model_flops
    # The count by hand (matmuls with attention and recomputation) agrees (measured: 97%).
    assert flops == pytest.approx(plan["analytic_flops_per_step"], rel=0.1)


def test_grad_accum_keeps_flops_and_shrinks_activations(tiny_plan):
    one, _ = tiny_plan
    two = compile_plan(_tiny("optimizer.grad_accum=2"), echo=False)
    assert two["tokens_per_step"] == one["tokens_per_step"]
    assert two["flops_per_step"] == pytest.approx(one["flops_per_step"], rel=0.05)
    assert two["memory"]["temporaries"] < one["memory"]["temporaries"]


def test_micro_batches_that_do_not_split_over_the_devices_are_config_errors():
    with pytest.raises(ConfigError, match="does not split over the 8 row shards"):
        compile_plan(_tiny("optimizer.grad_accum=4"), echo=False)


def test_cli_reports_a_bad_topology_in_one_line(capsys):
    argv = ["train", "--config", f"{DPO}:smoke=True", "--compile_only", "--topology", "v5p-63"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith('jaxalign: --topology "v5p-63"')


def test_the_real_scale_recipes_plan_without_their_files():
    for name, preset in (("llama3_8b", "llama3-8b"), ("llama3_70b", "llama3.1-70b")):
        config = load_config(str(ROOT / f"configs/dpo/{name}.py"))
        assert not pathlib.Path(config.model.init_from[3:]).exists()
        run = setup(config, read_files=False)
        assert run.tokenizer is None
        expected = models.get_preset(preset).replace(dtype="bfloat16", remat="full")
        assert run.model_config == expected


@pytest.mark.parametrize(
    "name, expected",
    [
        ("v5p-8", "v5p:2x2x1"),
        ("v5p-16", "v5p:2x2x2"),
        ("v5p-32", "v5p:2x2x4"),
        ("v5p-64", "v5p:2x4x4"),
        ("v5p-128", "v5p:4x4x4"),
        ("v5p-256", "v5p:4x4x8"),
        ("v5p-512", "v5p:4x8x8"),
        ("v4-64", "v4:2x4x4"),
        ("v5p:2x2x4", "v5p:2x2x4"),
    ],
)
def test_topology_names(name, expected):
    assert topology_name(name) == expected


@pytest.mark.parametrize("bad", ["v5p-63", "v5p-12", "v5e-16", "tpu"])
def test_bad_topology_names_are_config_errors(bad):
    with pytest.raises(ConfigError, match="--topology"):
        topology_name(bad)


@pytest.mark.skipif(HAS_LIBTPU, reason="checks the message shown when libtpu is missing")
def test_topology_without_libtpu_says_what_to_install():
    with pytest.raises(ConfigError, match=r"needs libtpu.*pip install 'jax\[tpu\]'"):
        compile_plan(_tiny(), topology="v5p-8", echo=False)


@pytest.mark.skipif(not HAS_LIBTPU, reason="AOT compilation for a TPU topology needs libtpu")
def test_compile_for_a_tpu_topology_on_this_machine(capsys):
    config = _tiny("mesh.fsdp=-1", "model.dtype=bfloat16", "model.remat=full")
    plan = compile_plan(config, topology="v5p-8")
    assert plan["devices"] == 4 and plan["topology"] == "v5p:2x2x1"
    assert plan["device_kind"].startswith("TPU")
    assert plan["memory"]["total"] > 0 and plan["flops_per_step"] > 0
    assert "4 x TPU" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("kto/tiny.py", ()),  # unpaired with the mismatched KL sequences: 2 sequences per example
        # forget set + retain set batch (slow: kto/tiny.py plans the unpaired family fast)
        pytest.param("npo/tiny.py", (), marks=pytest.mark.slow),
        ("reward/tiny.py", ()),  # pairs, reward head
    ],
)
def test_every_family_plans(name, overrides):
    config = apply_overrides(
        load_config(f"{ROOT / 'configs' / name}:smoke=True"),
        ["data.batch_size=16", *overrides],
    )
    plan = compile_plan(config, echo=False)
    run = setup(config, read_files=False)
    # Padded at their longest: every sequence of the batch (and of the retain batch) is a row.
    rows = 16 * run.objective.batch.sequences_per_example * (2 if config.data.retain else 1)
    assert plan["tokens_per_step"] == rows * config.data.max_len
    assert plan["memory"]["total"] > 0 and plan["flops_per_step"] > 0


def test_a_cached_reference_plans_no_reference(tiny_plan):
    uncached, _ = tiny_plan
    cached = compile_plan(_tiny("data.ref_logps=unused.jsonl"), echo=False)
    # 6N per token without the reference forward, 8N with it; and no reference weights.
    assert cached["model_flops_per_step"] * 8 == uncached["model_flops_per_step"] * 6
    assert cached["memory"]["arguments"] < uncached["memory"]["arguments"]


def test_fields_whose_width_needs_the_data_are_refused():
    with pytest.raises(ConfigError, match="cannot shape data.extra_fields"):
        compile_plan(_tiny("data.extra_fields=('chosen_margins',)"), echo=False)


GRPO = ROOT / "configs/grpo/tiny.py"


def _grpo(*overrides):
    # A KL term, so the plan holds the reference weights (the tiny config has none).
    base = ["data.batch_size=8", "rl.kl_coef=0.04"]
    return apply_overrides(load_config(f"{GRPO}:smoke=True"), [*base, *overrides])


@pytest.fixture(scope="module")
def grpo_plan():
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        plan = compile_plan(_grpo())
    return plan, text.getvalue()


def test_online_plan_reports_the_rollout_and_the_update(grpo_plan):
    plan, out = grpo_plan
    assert "\nrollout         sampling.generate: 8 prompts x rl.group_size 8 = 64 rows" in out
    assert "\nupdate          one of 1 per step" in out and "\nFLOPs/update" in out
    config, mc = _grpo(), models.get_preset("tiny-64")
    B, Tp, G, M = 8, config.data.max_prompt_len, config.rl.group_size, config.rl.max_new_tokens
    # The update trains on every row of the step, prompt + completion shifted by one.
    assert plan["updates_per_step"] == 1
    assert plan["tokens_per_step"] == B * G * (Tp + M - 1)
    rollout = plan["rollout"]
    assert (rollout["rows"], rollout["cache_slots"]) == (B * G, Tp + M)
    assert rollout["tokens"] == B * Tp + B * G * M
    mem, resident = rollout["memory"], rollout["resident"]
    param_bytes = models.param_count(mc) * 4
    # Weights fsdp-sharded over the 8 devices; every row's KV cache (k and v of L layers, S
    # slots, K heads of H floats) lives through the loop, the 64 rows split over 8 devices.
    assert param_bytes / 8 <= mem["arguments"] < param_bytes
    cache = 2 * mc.n_layers * B * G * (Tp + M) * mc.n_kv_heads * mc.head_dim * 4
    assert mem["temporaries"] >= cache / 8
    # Allocated beside the sampling program: AdamW's two moments and the reference weights.
    assert 2 * param_bytes / 8 <= resident["optimizer_state"] < 2 * param_bytes + 1024
    assert resident["reference"] == pytest.approx(mem["arguments"], rel=0.1)
    assert rollout["peak"] == mem["total"] + sum(resident.values())
    # The decode loop's body is counted once by XLA, M steps by hand.
    assert rollout["flops_counted_per_device"] * 8 < rollout["model_flops"]
    assert rollout["model_flops"] < rollout["analytic_flops"]


def test_rollout_flops_by_hand_match_the_compiled_program():
    # XLA counts each loop body once: with one layer, the prefill of B * Tp tokens (and the
    # unembedding of each prompt's last position) plus one decode step of the R rows, each token
    # 2 x (layer weights) + 4 S N H (scores and values over all S cache slots) + 2 D V. A wider
    # model than tiny-64, so that the token choice's elementwise work over [R, V] (not counted
    # by hand) stays small beside the matmuls.
    from jaxalign.train.plan import _compile_rollout, _flops, rollout_flops

    config = _grpo("mesh.fsdp=1", "mesh.data=-1")
    mc = models.get_preset("tiny-64").replace(n_layers=1, d_model=256, head_dim=64, d_ff=1024)
    counted = _flops(_compile_rollout(setup(config, model_config=mc, read_files=False)))
    B, Tp, G, M = 8, config.data.max_prompt_len, config.rl.group_size, config.rl.max_new_tokens
    S, R = Tp + M, B * G
    D, N, K, H, F, V = mc.d_model, mc.n_heads, mc.n_kv_heads, mc.head_dim, mc.d_ff, mc.vocab_size
    layer = 2 * (D * N * H + 2 * D * K * H + N * H * D + 3 * D * F) + 4 * S * N * H
    prefill_and_one_step = (B * Tp + R) * layer + (B + R) * 2 * D * V
    assert counted * 8 == pytest.approx(prefill_and_one_step, rel=0.1)  # rows over data=8
    # rollout_flops: the same count for every prefill token and M decode steps.
    assert rollout_flops(mc, B, Tp, G, M) == (B * Tp + R * M) * layer + (B + R * M) * 2 * D * V


def test_online_update_splits_into_minibatches(grpo_plan):
    one, _ = grpo_plan
    two = compile_plan(_grpo("rl.minibatches=2"), echo=False)
    assert two["updates_per_step"] == 2
    assert two["tokens_per_step"] * 2 == one["tokens_per_step"]
    assert two["rollout"]["memory"] == one["rollout"]["memory"]
    assert two["memory"]["temporaries"] < one["memory"]["temporaries"]
    with pytest.raises(ConfigError, match="rl.minibatches=3"):
        compile_plan(_grpo("rl.minibatches=3"), echo=False)


def test_the_grpo_recipe_plans_without_its_files():
    config = load_config(str(ROOT / "configs/grpo/qwen3_8b.py"))
    assert not pathlib.Path(config.model.init_from[3:]).exists()
    run = setup(config, read_files=False)
    expected = models.get_preset("qwen3-8b").replace(dtype="bfloat16", remat="full")
    assert run.model_config == expected and run.family.loop == "online"
