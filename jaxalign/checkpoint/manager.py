"""Run checkpoints: train state, data-iterator state and config in one Orbax step directory.

Layout under `<workdir>/checkpoints/<step>/`: `state` (params, optimizer state, step; sharded,
restored straight into the target shardings), `data` (the Grain iterator state, JSON) and `config`
(JSON, for the record). Orbax writes each step to a temporary directory and renames it when
complete, so a run killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxalign.errors import CheckpointError


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(workdir).absolute() / "checkpoints"


def make_manager(workdir, *, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict, config: dict):
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
        ),
        force=True,
    )


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keys)


def check_params(item: pathlib.Path, abstract_params: Any) -> None:
    """Compare the parameter shapes saved in a checkpoint item with the ones a model needs; a
    missing tensor or another shape is a CheckpointError naming the tensor (instead of Orbax's
    traceback from inside the restore)."""
    try:
        saved = ocp.PyTreeCheckpointHandler().metadata(item).tree
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise CheckpointError(f"{item}: unreadable checkpoint metadata ({e})") from None
    saved = dict(jax.tree_util.tree_flatten_with_path(saved.get("params", {}))[0])
    saved = {_path(k): v for k, v in saved.items()}
    for keys, want in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        name = _path(keys)
        have = saved.get(name)
        if have is None:
            raise CheckpointError(
                f"{item}: holds no tensor params/{name} (the model needs shape {tuple(want.shape)})"
                "; is it a checkpoint of this architecture?"
            )
        if tuple(have.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{item}: params/{name} has shape {tuple(have.shape)} but the model needs "
                f"{tuple(want.shape)}; is it a checkpoint of this architecture?"
            )


def restore(manager: ocp.CheckpointManager, abstract_state, step: int | None = None):
    """Restore `(state, data_state)` at `step` (default: latest) into the abstract shardings."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"{manager.directory}: no checkpoint to restore")
    check_params(pathlib.Path(manager.directory) / str(step) / "state", abstract_state["params"])
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        ),
    )
    return restored["state"], restored["data"]


def open_latest(workdir) -> tuple[ocp.CheckpointManager, int]:
    """A read-only manager over an existing run's checkpoints and its latest step.

    Creates nothing: a mistyped path raises `CheckpointError` and leaves no directory behind.
    The caller closes the manager.
    """
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no checkpoint (directory not found)")
    options = ocp.CheckpointManagerOptions(create=False, read_only=True)
    manager = ocp.CheckpointManager(directory, options=options)
    step = manager.latest_step()
    if step is None:
        manager.close()
        raise CheckpointError(f"{directory}: no checkpoint")
    return manager, step


def load_params(workdir, abstract_params: Any) -> Any:
    """Params of the latest checkpoint of another run (`model.init_from = "checkpoint:DIR"`).

    Only the `params` subtree is read; the optimizer state of that run is not touched.
    """
    manager, step = open_latest(workdir)
    manager.close()
    item = checkpoint_dir(workdir) / str(step) / "state"
    check_params(item, abstract_params)
    target = {"params": abstract_params}
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
        target,
    )
    with ocp.PyTreeCheckpointer() as ckptr:
        restored = ckptr.restore(
            item,
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True
            ),
        )
    return restored["params"]
