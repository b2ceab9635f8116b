"""Orbax checkpoints of the train state and the data iterator, preemption-safe.

Every process takes part in every save and restore (orbax coordinates them; a save on one
process only would hang the others). Saves are asynchronous: the train loop continues while
the arrays are written, and a checkpoint only becomes visible (``latest_step``) once it is
complete, so a run killed in the middle of a save restarts from the previous one. The
half-written ``<step>.orbax-checkpoint-tmp`` directory such a kill leaves is deleted when the
next run starts (it would otherwise stay forever when no later save reuses that step, as after a
stop-signal save cut short by SIGKILL).

Each checkpoint also records the config it was trained with (``saved_config``), which the
training program compares with its own before resuming and the evaluation program uses.
``workdir`` may be any ``etils.epath`` path: local, or ``gs://...`` (orbax writes the arrays
with TensorStore's GCS driver).
"""

from __future__ import annotations

import json
import os
import signal

import jax
import orbax.checkpoint as ocp
from etils import epath

from diffusion_jax import input_pipeline


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be restored; nothing is deleted."""


def absolute(path) -> epath.Path:
    """``path`` as an ``epath.Path``: a local one made absolute (orbax needs that), a URI such as
    ``gs://bucket/dir`` as it is (``absolute()`` would turn it into a local path)."""
    path = epath.Path(path)
    return path if "://" in os.fspath(path) else path.absolute()


class Checkpointer:
    """Saves ``{"state": train state, "data": iterator position, "config": the config as JSON}``
    under ``workdir/checkpoints``."""

    def __init__(self, workdir, *, keep: int | None = 1, async_save: bool = True, read_only=False):
        """``keep``: the latest checkpoints kept (None: all); ``read_only``: for evaluation;
        creates, cleans up and deletes nothing."""
        self.directory = absolute(workdir) / "checkpoints"
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None if read_only else keep,
                create=not read_only,
                cleanup_tmp_directories=not read_only,
                enable_async_checkpointing=async_save and not read_only,
                read_only=read_only,
            ),
            item_names=("state", "data", "config"),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, data_iterator, config, *, force: bool = False) -> bool:
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=input_pipeline.iterator_checkpoint_args(data_iterator, restore=False),
                config=_config_args(config),
            ),
            force=force,
        )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save_ema_params(self, step: int, ema_params, config) -> None:
        """Saves checkpoint ``step`` with only ``ema_params`` in its state, and ``config``: all
        the evaluation program reads (``restore_ema_params``, ``saved_config``), for parameters
        made after training (``posthoc_ema``); training cannot resume from it. Waits until it
        is written."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({"ema_params": ema_params}),
                config=_config_args(config),
            ),
        )
        self.wait()

    def saved_config(self, step: int) -> dict | None:
        """The config checkpoint ``step`` was trained with (nested dicts, as ``save`` got it);
        None for a checkpoint saved before checkpoints recorded it."""
        if not (self.directory / str(step) / "config").exists():
            return None
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
            )
        except Exception as e:  # orbax raises many types; all mean "this one is unusable"
            raise CheckpointError(
                f"Cannot read the config of checkpoint {step} in {self.directory}: "
                f"{type(e).__name__}: {e}"
            ) from e
        return restored["config"]

    def restore(self, step: int, abstract_state, data_iterator):
        """Restores the state onto the shardings of ``abstract_state`` (any device count) and
        moves ``data_iterator`` to the saved position (saved by any number of processes)."""
        data_dir = self.directory / str(step) / "data"
        # grain names the iterator file of each process after the process count of the save.
        own_file = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        same_processes = own_file.exists()
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if same_processes:
            items["data"] = input_pipeline.iterator_checkpoint_args(data_iterator, restore=True)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
            if not same_processes:
                _restore_position_saved_by_other_processes(data_dir, data_iterator)
        except Exception as e:  # orbax raises many types; all mean "this one is unusable"
            raise CheckpointError(
                f"Cannot restore checkpoint {step} in {self.directory}: {type(e).__name__}: {e}. "
                "It was left untouched: move it away to resume from an earlier one, or use "
                "another --workdir."
            ) from e
        return restored["state"]

    def step_to_evaluate(self, step: int | None) -> int:
        """``step`` if it has a checkpoint (None: the latest); else a CheckpointError."""
        steps = self._manager.all_steps()
        if not steps:
            raise CheckpointError(f"No checkpoint in {self.directory}: nothing to evaluate")
        if step is None:
            return max(steps)
        if step not in steps:
            raise CheckpointError(
                f"No checkpoint of step {step} in {self.directory}; available steps: "
                f"{', '.join(map(str, sorted(steps)))}"
            )
        return step

    def restore_ema_params(self, step: int, abstract_ema_params):
        """The EMA parameters of checkpoint ``step``, laid out as ``abstract_ema_params``
        (ShapeDtypeStructs with shardings). Reads neither the rest of the train state nor the
        data iterator's position."""
        item = {"ema_params": abstract_ema_params}
        partial = ocp.args.PyTreeRestore(
            item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        )
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(state=partial))
        except Exception as e:  # orbax raises many types; all mean "this one is unusable"
            raise CheckpointError(
                f"Cannot restore the EMA parameters of checkpoint {step} in {self.directory}: "
                f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            ) from e
        return restored["state"]["ema_params"]

    def reached_preemption(self, step: int) -> bool:
        """True on every process once a preemption notice (SIGTERM under jax.distributed's
        preemption service) has been agreed on for this step."""
        return self._manager.reached_preemption(step)

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.close()


def _config_args(config) -> ocp.args.JsonSave:
    return ocp.args.JsonSave(json.loads(config.to_json_best_effort()))


def _restore_position_saved_by_other_processes(data_dir: epath.Path, data_iterator):
    """Moves ``data_iterator`` to the position saved by a run with another process count.

    Every process iterates over the same sequence of global batches (it only keeps its own rows
    of each), so all processes saved the same position: any of their files will do.
    """
    positions = {path.read_text() for path in data_dir.glob("process_*-of-*.json")}
    if len(positions) != 1:
        raise ValueError(
            f"expected one data iterator position in {data_dir}, found {len(positions)}"
        )
    data_iterator.set_state(json.loads(positions.pop()))
    data_iterator.start_prefetch()


class StopSignal:
    """Records SIGTERM (preemption, ``kill``) and SIGINT (Ctrl-C) so that the train loop saves
    and exits at the next step boundary instead of losing the steps since the last checkpoint.

    Single-process runs only: under ``jax.distributed`` the preemption service owns SIGTERM
    and ``Checkpointer.reached_preemption`` makes every process stop at the same step.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.received = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def restore_handlers(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
