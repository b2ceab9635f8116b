"""Sample quality against network evaluations across objectives (DDPM, EDM, flow matching).

    python bench/objective_quality.py --runs ddpm=RUN_A,edm=RUN_B,flow=RUN_C \\
        --results=objectives.jsonl --out_dir=/tmp/objective_samples
    python bench/objective_quality.py --results=objectives.jsonl --plot=objectives.png

For every run (a trained workdir, labelled by its objective), every sampling method its
objective runs (``--methods``: those that do not apply are skipped) and every budget of network
evaluations E (``--evaluations``), the chain gets the most steps whose evaluations fit in E
(``config_lib.num_evaluations``), and the evaluation program's ``sample`` and ``fid`` modes
score ``--num_samples`` samples (the run's ``eval.seed``). One JSON line per point is appended
to ``--results``; points already there are skipped. Each run's ``eval/`` is written: use
copies of runs you must not touch. ``--plot`` prints a Markdown table of the Frechet distance
per objective and method, and draws it against evaluations.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import append_result, emit, read_results, sample_and_score  # noqa: E402

from diffusion_jax import config_lib, ode_sampling, sampling, xla_flags  # noqa: E402


def methods_of(objective: str) -> tuple[str, ...]:
    return sampling.SAMPLING_METHODS if objective == "ddpm" else tuple(ode_sampling.METHODS)


def steps_for(config, method: str, evaluations: int) -> int | None:
    """The most steps of ``method`` whose network evaluations fit in ``evaluations``."""
    best = None
    limit = config.diffusion.num_timesteps if config.objective.name == "ddpm" else evaluations
    for steps in range(1, min(evaluations, limit) + 1):
        config.sampling.update(method=method, num_steps=steps)
        minimum = sampling.METHODS[method].min_steps if method in sampling.METHODS else 1
        if steps >= minimum and config_lib.num_evaluations(config) <= evaluations:
            best = steps
    return best


def sweep(args):
    xla_flags.configure()  # as the evaluation program does, before JAX starts a backend
    done = {(r["run"], r["method"], r["num_steps"]) for r in read_results(args.results)}
    for label, workdir in args.runs.items():
        config = config_lib.load(workdir)
        objective = config.objective.name
        for method in [m for m in args.methods if m in methods_of(objective)]:
            for evaluations in args.evaluations:
                steps = steps_for(config, method, evaluations)
                if steps is None or (label, method, steps) in done:
                    continue
                done.add((label, method, steps))
                overrides = {
                    "sampling.method": method,
                    "sampling.num_steps": steps,
                    "sampling.spacing": args.ddpm_spacing if objective == "ddpm" else "even",
                    "eval.sample_dir": os.path.join(args.out_dir, f"{label}_{method}_{steps}"),
                    "eval.num_samples": args.num_samples,
                    "eval.batch_size": args.batch_size,
                    "eval.reference_dir": args.reference_dir,
                }
                config.sampling.update(method=method, num_steps=steps)
                scores, sample_s = sample_and_score(workdir, overrides)
                line = emit(
                    bench="objective_quality",
                    run=label,
                    objective=objective,
                    method=method,
                    num_steps=steps,
                    evaluations=config_lib.num_evaluations(config),
                    num_samples=args.num_samples,
                    fid=scores["fid"],
                    precision=scores["precision"],
                    recall=scores["recall"],
                    feature_network=scores["feature_network"],
                    sample_s=sample_s,
                )
                append_result(args.results, line)


def table_and_plot(args):
    results = read_results(args.results)
    runs = list(dict.fromkeys(r["run"] for r in results))
    print("| run | method | " + " | ".join(f"{e} evals" for e in args.evaluations) + " |")
    print("|---|---|" + "---|" * len(args.evaluations))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, run in enumerate(runs):
        mine = [r for r in results if r["run"] == run]
        for j, method in enumerate(dict.fromkeys(r["method"] for r in mine)):
            points = sorted((r["evaluations"], r["fid"]) for r in mine if r["method"] == method)
            cells = []
            for budget in args.evaluations:
                fitting = [p for p in points if p[0] <= budget]
                best = fitting[-1] if fitting else None
                used = "" if best is None or best[0] == budget else f" ({best[0]})"
                cells.append("-" if best is None else f"{best[1]:.2f}{used}")
            print(f"| {run} | {method} | " + " | ".join(cells) + " |")
            ax.plot(
                *zip(*points, strict=True),
                marker="o",
                color=f"C{i}",
                ls=("-", "--", ":", "-.", (0, (1, 3)))[j % 5],
                label=f"{run} {method}",
            )
    if args.reference_fid:
        ax.axhline(args.reference_fid, color="k", lw=0.8, label=args.reference_label)
    ax.set(xscale="log", yscale="log", xlabel="network evaluations per sample")
    ax.set_ylabel("Frechet distance (digits classifier)")
    ax.legend(fontsize=7)
    fig.suptitle(f"digits, {results[0]['num_samples']} samples per point", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    print(f"plot: {args.plot}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", required=True, help="JSON lines file, appended to")
    parser.add_argument("--runs", help="label=workdir,... (their eval/ is written); sweeps")
    parser.add_argument("--out_dir", help="where the sample directories go")
    parser.add_argument("--reference_dir", default="", help="eval.reference_dir")
    parser.add_argument("--plot", help="instead of sweeping: print the table, draw this PNG")
    parser.add_argument(
        "--methods", default="ancestral,dpmpp_3m,euler,heun", help="those a run can't: skipped"
    )
    parser.add_argument("--reference_fid", type=float, help="--plot: a horizontal line here")
    parser.add_argument("--reference_label", default="reference", help="its legend entry")
    parser.add_argument("--ddpm_spacing", default="logsnr", help="sampling.spacing of ddpm runs")
    parser.add_argument("--evaluations", default="9,17,35,69,200")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=500)
    args = parser.parse_args(argv)
    args.methods = args.methods.split(",")
    args.evaluations = [int(e) for e in args.evaluations.split(",")]
    if args.plot:
        table_and_plot(args)
    elif args.runs and args.out_dir:
        args.runs = dict(item.split("=", 1) for item in args.runs.split(","))
        sweep(args)
    else:
        parser.error("give --runs and --out_dir to sweep, or --plot")


if __name__ == "__main__":
    main()
