"""Training curves of several runs side by side, read from their TensorBoard event files.

    python bench/compare_runs.py float32=/tmp/digits_f32 bfloat16=/tmp/digits_bf16
    python bench/compare_runs.py --tag train/grad_norm a=WORKDIR_A b=WORKDIR_B

Each ``NAME=WORKDIR`` is a ``diffusion_jax.train`` workdir; its ``tensorboard/`` event files
(written by tensorboardX) are read without TensorBoard: TFRecord framing (length, its CRC,
the serialised ``Event``, its CRC) around tensorboardX's own ``Event`` protos. Prints a table,
one row per logged step with each run's value of ``--tag`` (a metric logged every
``training.log_every`` steps: the mean over those steps) and each run's ratio to the first run,
then one JSON line with the last values.
"""

import argparse
import glob
import os
import struct
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import emit  # noqa: E402


def read_scalars(workdir: str, tag: str) -> dict[int, float]:
    """``{step: value}`` of scalar ``tag`` in a workdir's event files (later files win)."""
    from tensorboardX.proto import event_pb2

    values = {}
    for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            while header := f.read(12):  # uint64 length, uint32 CRC of the length
                (length,) = struct.unpack("<Q", header[:8])
                event = event_pb2.Event.FromString(f.read(length))
                f.read(4)  # CRC of the data
                for value in event.summary.value:
                    if value.tag == tag:
                        values[event.step] = value.simple_value
    return values


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="NAME=WORKDIR", help="runs to compare")
    parser.add_argument("--tag", default="train/loss", help="TensorBoard scalar to compare")
    args = parser.parse_args(argv)
    if any("=" not in run for run in args.runs):
        parser.error("each run is NAME=WORKDIR")
    runs = dict(run.split("=", 1) for run in args.runs)
    curves = {name: read_scalars(workdir, args.tag) for name, workdir in runs.items()}
    for name, curve in curves.items():
        if not curve:
            parser.error(f"no {args.tag!r} in {runs[name]}/tensorboard")

    names = list(curves)
    first = curves[names[0]]
    header = ["step", *names, *(f"{n}/{names[0]}" for n in names[1:])]
    print(args.tag)
    print(" ".join(f"{h:>16s}" for h in header))
    for step in sorted(set().union(*curves.values())):
        row = [f"{step:16d}"]
        row += [f"{curves[n][step]:16.5f}" if step in curves[n] else f"{'-':>16s}" for n in names]
        for n in names[1:]:
            both = step in curves[n] and step in first and first[step]
            row.append(f"{curves[n][step] / first[step]:16.4f}" if both else f"{'-':>16s}")
        print(" ".join(row))
    last = {name: curve[max(curve)] for name, curve in curves.items()}
    emit(
        bench="compare_runs",
        tag=args.tag,
        last_step={name: max(curve) for name, curve in curves.items()},
        last={name: float(f"{value:.5g}") for name, value in last.items()},
        last_over_first={n: float(f"{last[n] / last[names[0]]:.4g}") for n in names[1:]},
    )


if __name__ == "__main__":
    main()
