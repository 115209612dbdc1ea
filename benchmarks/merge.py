"""`jaxalign merge` on random Hugging Face Llama directories: memory against one model's size,
wall time, and mergekit side by side on the same inputs when it is installed.

    .venv/bin/python benchmarks/merge.py                        # 8192 x 512 vocabulary, 6 layers
    .venv/bin/python benchmarks/merge.py --mergekit /tmp/mkvenv/bin/mergekit-yaml
    .venv/bin/python benchmarks/merge.py --vocab 128 --width 32 --layers 2   # seconds

Builds a base and ``--models`` fine-tunes of it (float32, ``transformers`` random init; every
weight ``base + 0.02 * N(0, 1)``, so the task vectors have mixed signs), then merges them with
``linear`` (weights 0.5, 0.3, 0.2, normalised) and ``ties`` (the same weights, density 0.5,
lam 1). Each merge runs as its own subprocess (``python -m jaxalign.cli merge``; mergekit's
``mergekit-yaml``) so that its peak RSS (``os.wait4``'s ``ru_maxrss`` of that child) is the
merge's own, JAX's or torch's runtime included; the jaxalign row also shows the driver's "peak
tensors held". With ``--mergekit`` (the ``mergekit-yaml`` script, or a Python that has mergekit)
the same merges run through mergekit (``linear``; ``ties`` with ``normalize: true``, the same
weights and densities, ``lambda: 1``), and the outputs are compared tensor by tensor (max abs
difference; for TIES also the fraction of entries that differ).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
WEIGHTS = (0.5, 0.3, 0.2)


def build_models(root: pathlib.Path, vocab: int, width: int, layers: int, n: int) -> list:
    """[base, model_1, ..., model_n] as Hugging Face Llama directories under ``root``."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=max(width // 64, 1),
        num_key_value_heads=max(width // 128, 1),
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dirs = []
    for i in range(n + 1):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base[name] + (0.02 * torch.randn_like(p) if i else 0.0))
        path = root / ("base" if i == 0 else f"model{i}")
        model.save_pretrained(path)
        dirs.append(path)
    return dirs


def jaxalign_merge(method: str, dirs: list, out: pathlib.Path, density: float) -> dict:
    base, models = dirs[0], dirs[1:]
    entries = ", ".join(
        f'{{"model": "hf:{m}", "weight": {w}, "density": {density}}}'
        for m, w in zip(models, WEIGHTS, strict=False)
    )
    cfg = out.parent / f"{out.name}.py"
    cfg.write_text(
        "from jaxalign.merge.driver import merge_config\n\n\ndef get_config(arg=None):\n"
        f'    c = merge_config()\n    c.method = "{method}"\n'
        + (f'    c.base = "hf:{base}"\n' if method != "linear" else "")
        + f"    c.models = ({entries},)\n    return c\n"
    )
    cmd = [sys.executable, "-m", "jaxalign.cli", "merge", "--config", str(cfg), "--out", str(out)]
    wall, rss, printed = _timed(cmd)
    held = float(printed.split("peak tensors held ")[1].split(" MiB")[0])
    return {"wall": wall, "rss": rss, "held_mib": held}


def _timed(cmd: list[str]) -> tuple[float, int, str]:
    """Runs ``cmd`` as a child: (wall seconds, its own peak RSS in bytes, its stdout)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout = proc.stdout.read()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{stderr.decode()[-3000:]}")
    return wall, usage.ru_maxrss * 1024, stdout.decode()


def mergekit_merge(cli: list[str], method: str, dirs: list, out, density: float) -> dict:
    base, models = dirs[0], dirs[1:]
    lines = [f"merge_method: {method}", "dtype: float32", "out_dtype: float32"]
    if method != "linear":
        lines += [f"base_model: {base}", "parameters:", "  normalize: true", "  lambda: 1.0"]
    else:
        lines += ["parameters:", "  normalize: true"]
    lines.append("models:")
    for m, w in zip(models, WEIGHTS, strict=False):
        lines += [f"  - model: {m}", "    parameters:", f"      weight: {w}"]
        if method != "linear":
            lines.append(f"      density: {density}")
    cfg = out.parent / f"{out.name}.yml"
    cfg.write_text("\n".join(lines) + "\n")
    wall, rss, _ = _timed([*cli, str(cfg), str(out)])
    return {"wall": wall, "rss": rss}


def load_dir(path: pathlib.Path) -> dict:
    from safetensors.numpy import load_file

    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors |= load_file(str(file))
    return tensors


def compare(ours: pathlib.Path, theirs: pathlib.Path) -> tuple[float, str, float]:
    """(max abs difference, the tensor where it is, fraction of entries that differ > 1e-6)."""
    a, b = load_dir(ours), load_dir(theirs)
    if set(a) != set(b):
        raise RuntimeError(f"tensor names differ: {sorted(set(a) ^ set(b))[:4]}")
    worst, where, differ, total = 0.0, "", 0, 0
    for name in sorted(a):
        d = np.abs(a[name].astype(np.float64) - b[name].astype(np.float64))
        if d.max() > worst:
            worst, where = float(d.max()), name
        differ += int((d > 1e-6).sum())
        total += d.size
    return worst, where, differ / total


def mergekit_command(path: str) -> list[str]:
    """``mergekit-yaml`` itself, or ``PYTHON -m mergekit.scripts.run_yaml``."""
    if pathlib.Path(path).name.startswith("python"):
        return [path, "-m", "mergekit.scripts.run_yaml"]
    return [path]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--models", type=int, default=3, choices=(1, 2, 3))
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--methods", default="linear,ties")
    parser.add_argument("--mergekit", default="", help="mergekit-yaml, or a Python with mergekit")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="merge-bench-") as tmp:
        root = pathlib.Path(tmp)
        dirs = build_models(root, args.vocab, args.width, args.layers, args.models)
        model_mib = sum(os.path.getsize(f) for f in dirs[0].glob("*.safetensors")) / 2**20
        print(
            f"{args.models} models + base: Llama, vocabulary {args.vocab} x width {args.width}, "
            f"{args.layers} layers, float32, {model_mib:.1f} MiB each"
        )
        print(f"{'method':8} {'tool':9} {'wall s':>7} {'peak RSS MiB':>13} {'held MiB':>9}  note")
        for method in args.methods.split(","):
            ours = root / f"jaxalign-{method}"
            r = jaxalign_merge(method, dirs, ours, args.density)
            results[(method, "jaxalign")] = r
            print(
                f"{method:8} {'jaxalign':9} {r['wall']:7.1f} {r['rss'] / 2**20:13.0f} "
                f"{r['held_mib']:9.1f}  held = {r['held_mib'] / model_mib:.0%} of one model"
            )
            if not args.mergekit:
                continue
            theirs = root / f"mergekit-{method}"
            m = mergekit_merge(mergekit_command(args.mergekit), method, dirs, theirs, args.density)
            m["max_abs_diff"], m["where"], m["differ"] = compare(ours, theirs)
            results[(method, "mergekit")] = m
            print(
                f"{method:8} {'mergekit':9} {m['wall']:7.1f} {m['rss'] / 2**20:13.0f} {'':>9}  "
                f"max |jaxalign - mergekit| {m['max_abs_diff']:.2e} ({m['where']}); "
                f"{m['differ']:.2%} of entries differ by > 1e-6"
            )
        if not args.mergekit:
            print("mergekit: not compared (pass --mergekit PATH-TO-mergekit-yaml)")
    print(json.dumps({f"{k[0]}/{k[1]}": v for k, v in results.items()}, default=str))
    return results


if __name__ == "__main__":
    main()
