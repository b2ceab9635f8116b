"""Sample quality against network evaluations for every sampling method, from a trained workdir.

    python bench/sampler_quality.py --workdir=COPY_OF_RUN --results=quality.jsonl \\
        --out_dir=/tmp/quality_samples --reference_dir=/tmp/qs/ref
    python bench/sampler_quality.py --results=quality.jsonl --plot=quality.png \\
        --out_dir=/tmp/quality_samples   # the tables and the plot

For each method, spacing and evaluation budget E, the chain gets the most grid steps K whose
evaluations (``sampling.num_evaluations``: K, or 2K - 1 for heun) fit in E (none if even the
method's ``min_steps`` do not), and the evaluation program's ``sample`` and ``fid`` modes
(``eval.num_samples`` samples at ``eval.batch_size``, the run's ``eval.seed``: the same noise
for every point) score it. One JSON line per point is appended to ``--results``; points
already there are skipped, so an interrupted sweep resumes. The workdir's ``eval/`` is
written: use a copy of a run you must not touch. ``--plot`` prints Markdown tables, FID per
method, spacing and budget (the evaluations actually used where fewer) and, with the sample
directories (``--out_dir``), the deterministic methods' RMSE in 8-bit levels from the
converged ODE solution (``dpmpp_3m`` over all T steps, the same starting noise), and draws
both against evaluations, one panel per spacing.
"""

import argparse
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import append_result, emit, read_results, sample_and_score  # noqa: E402

from diffusion_jax import config_lib, sampling, schedules, xla_flags  # noqa: E402


def steps_for(method: str, evaluations: int, num_timesteps: int) -> int | None:
    """The most grid steps (<= T) whose evaluations fit in ``evaluations``, or None."""
    spec = sampling.METHODS[method]
    steps = min(num_timesteps, (evaluations - 1) // spec.stages + 1)
    return steps if steps >= spec.min_steps else None


def sweep(args):
    xla_flags.configure()  # as the evaluation program does, before JAX starts a backend
    num_timesteps = config_lib.load(args.workdir).diffusion.num_timesteps
    done = {(r["method"], r["spacing"], r["num_steps"]) for r in read_results(args.results)}
    points = [("ancestral", "even", num_timesteps)]  # the reference: the full chain
    for spacing in args.spacings:
        for method in args.methods:
            for evaluations in args.evaluations:
                steps = steps_for(method, evaluations, num_timesteps)
                # Every spacing of all T steps is the full chain: run it once, as "even".
                point = (method, spacing if steps != num_timesteps else "even", steps)
                if steps is not None and point not in points:
                    points.append(point)
    for method, spacing, steps in points:
        if (method, spacing, steps) in done:
            continue
        sample_dir = os.path.join(args.out_dir, f"{method}_{spacing}_{steps}")
        overrides = {
            "sampling.method": method,
            "sampling.spacing": spacing,
            "sampling.num_steps": steps,
            "eval.sample_dir": sample_dir,
            "eval.num_samples": args.num_samples,
            "eval.batch_size": args.batch_size,
            "eval.reference_dir": args.reference_dir,
        }
        scores, sample_s = sample_and_score(args.workdir, overrides)
        line = emit(
            bench="sampler_quality",
            method=method,
            spacing=spacing,
            num_steps=steps,
            evaluations=sampling.num_evaluations(method, steps),
            num_samples=args.num_samples,
            fid=scores["fid"],
            kid=scores["kid"],
            precision=scores["precision"],
            recall=scores["recall"],
            feature_network=scores["feature_network"],
            sample_s=sample_s,
        )
        append_result(args.results, line)


def _load_samples(directory) -> np.ndarray:
    shards = sorted(glob.glob(os.path.join(directory, "shard_*.npz")))
    return np.concatenate([np.load(path)["images"] for path in shards]).astype(np.float64)


def table_and_plot(args):
    results = read_results(args.results)
    reference = max(
        (r for r in results if r["method"] == "ancestral"), key=lambda r: r["num_steps"]
    )
    num_timesteps = reference["num_steps"]  # the full chain
    print(
        f"reference: ancestral, all {num_timesteps} steps: FID {reference['fid']:.3f} "
        f"({reference['num_samples']} samples, {reference['feature_network']})"
    )
    by_point = {(r["method"], r["spacing"], r["num_steps"]): r for r in results}

    def point(method, spacing, budget):
        """The result of ``method`` at this budget, or None (every spacing of T is "even")."""
        steps = steps_for(method, budget, num_timesteps)
        if steps is None:
            return None
        return by_point.get((method, spacing if steps != num_timesteps else "even", steps))

    ode = [m for m in args.methods if m != "ancestral"]
    ode_dir = lambda method, spacing, steps: os.path.join(
        args.out_dir or "", f"{method}_{spacing}_{steps}"
    )
    ode_reference = None
    if args.out_dir:  # the converged ODE solution: dpmpp_3m over all T steps
        ode_reference = _load_samples(ode_dir("dpmpp_3m", "even", num_timesteps))

    def ode_rmse(r):
        """RMSE in 8-bit levels of these samples from the ODE reference (same noise); None for
        the reference itself."""
        if (r["method"], r["num_steps"]) == ("dpmpp_3m", num_timesteps):
            return None
        samples = _load_samples(ode_dir(r["method"], r["spacing"], r["num_steps"]))
        return float(np.sqrt(np.mean((samples - ode_reference) ** 2)))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 if ode_reference is not None else 1
    fig, axes = plt.subplots(
        rows, len(args.spacings), figsize=(3.6 * len(args.spacings), 3.4 * rows), squeeze=False
    )
    tables = [("FID", lambda r: r["fid"], args.methods)]
    if ode_reference is not None:
        tables.append(("RMSE to the ODE solution (8-bit levels)", ode_rmse, ode))
    for row, (what, value, methods) in enumerate(tables):
        print(f"\n{what}; (E): evaluations used where the budget allows no more")
        print("| method | spacing | " + " | ".join(f"{e} evals" for e in args.evaluations) + " |")
        print("|---|---|" + "---|" * len(args.evaluations))
        for column, spacing in enumerate(args.spacings):
            ax = axes[row, column]
            for method in methods:
                cells, line = [], []
                for budget in args.evaluations:
                    r = point(method, spacing, budget)
                    if r is None:
                        cells.append("-")
                        continue
                    v = value(r)
                    used = "" if r["evaluations"] == budget else f" ({r['evaluations']})"
                    cells.append(("ref" if v is None else f"{v:.2f}") + used)
                    if v is not None:
                        line.append((r["evaluations"], v))
                print(f"| {method} | {spacing} | " + " | ".join(cells) + " |")
                if line:
                    color = f"C{sampling.SAMPLING_METHODS.index(method)}"
                    ax.plot(*zip(*line, strict=True), marker="o", color=color, label=method)
            if row == 0:
                ax.axhline(reference["fid"], color="k", lw=0.8)
                ax.axhline(1.1 * reference["fid"], color="k", lw=0.8, ls=":")
            ax.set(xscale="log", yscale="log", xlabel="network evaluations", title=spacing)
            ax.set_ylabel(what if column == 0 else None, fontsize=8)
        axes[row, 0].legend(fontsize=7)
    fig.suptitle(
        f"digits, {reference['num_samples']} samples; lines: ancestral over all "
        f"{num_timesteps} steps and +10%",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    print(f"plot: {args.plot}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", required=True, help="JSON lines file, appended to")
    parser.add_argument("--workdir", help="a trained workdir (its eval/ is written); sweeps")
    parser.add_argument(
        "--out_dir", help="where the sample directories go; with --plot, also the ODE distances"
    )
    parser.add_argument("--reference_dir", default="", help="eval.reference_dir")
    parser.add_argument("--plot", help="instead of sweeping: print the table, draw this PNG")
    parser.add_argument("--methods", default=",".join(sampling.SAMPLING_METHODS))
    parser.add_argument("--spacings", default=",".join(schedules.SPACINGS))
    parser.add_argument("--evaluations", default="5,10,20,50,100,200")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=500)
    args = parser.parse_args(argv)
    args.methods = args.methods.split(",")
    args.spacings = args.spacings.split(",")
    args.evaluations = [int(e) for e in args.evaluations.split(",")]
    if args.plot:
        table_and_plot(args)
    elif args.workdir and args.out_dir:
        sweep(args)
    else:
        parser.error("give --workdir and --out_dir to sweep, or --plot")


if __name__ == "__main__":
    main()
