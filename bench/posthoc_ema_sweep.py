"""Sample quality against the EMA length, by post-hoc EMA (``diffusion_jax.posthoc_ema``).

    python bench/posthoc_ema_sweep.py --workdir=RUN --out_dir=/tmp/phema \\
        --results=bench/results/posthoc_ema.jsonl
    python bench/posthoc_ema_sweep.py --results=bench/results/posthoc_ema.jsonl \\
        --plot=bench/results/posthoc_ema.png

``RUN`` is a run trained with ``training.posthoc_ema_stds``. For every ``--sigma_rels`` the
parameters are reconstructed at the last snapshot into ``--out_dir/sigma_rel<σ>`` and the
evaluation program's ``sample`` and ``fid`` modes score ``--num_samples`` samples of them; then
the same for the run's own EMA (``optim.ema_decay``; it writes ``RUN/eval``), whose
``sigma_rel`` is that of a constant decay ``beta`` over ``T`` steps, ``sqrt(beta) / ((1 -
beta) T)``. One JSON line per point is appended to ``--results``; points already there are
skipped. ``--plot`` prints a Markdown table and draws the Frechet distance against sigma_rel.
"""

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import append_result, emit, read_results, sample_and_score  # noqa: E402

from diffusion_jax import posthoc_ema, pretrained, xla_flags  # noqa: E402


def ordinary_sigma_rel(decay: float, steps: int) -> float:
    """sigma_rel of the EMA of constant ``decay`` after ``steps`` steps: its weights
    ``(1 - decay) decay^k`` over the k-th latest step have standard deviation ``sqrt(decay) /
    (1 - decay)`` steps (once ``decay^steps`` is negligible)."""
    return math.sqrt(decay) / (1 - decay) / steps


def sweep(args):
    xla_flags.configure()  # as the evaluation program does, before JAX starts a backend
    done = {r["ema"] for r in read_results(args.results)}
    overrides = {
        "eval.num_samples": args.num_samples,
        "eval.batch_size": args.batch_size,
        "eval.reference_dir": args.reference_dir,
    }
    for sigma in args.sigma_rels:
        if f"posthoc {sigma}" in done:
            continue
        out = os.path.join(args.out_dir, f"sigma_rel{sigma!r}")
        record = posthoc_ema.reconstruct(args.workdir, sigma, out=out)
        scores, sample_s = sample_and_score(out, overrides)
        line = emit(
            bench="posthoc_ema",
            ema=f"posthoc {sigma}",
            sigma_rel=sigma,
            gamma=record["gamma"],
            relative_residual=record["relative_residual"],
            step=record["step"],
            num_samples=args.num_samples,
            fid=scores["fid"],
            feature_network=scores["feature_network"],
            sample_s=sample_s,
        )
        append_result(args.results, line)
    if "ordinary" not in done:
        config, step = pretrained.load_config(args.workdir, None)
        scores, sample_s = sample_and_score(args.workdir, overrides)
        line = emit(
            bench="posthoc_ema",
            ema="ordinary",
            ema_decay=config.optim.ema_decay,
            sigma_rel=ordinary_sigma_rel(config.optim.ema_decay, step),
            step=step,
            num_samples=args.num_samples,
            fid=scores["fid"],
            feature_network=scores["feature_network"],
            sample_s=sample_s,
        )
        append_result(args.results, line)


def table_and_plot(args):
    results = read_results(args.results)
    posthoc = sorted((r for r in results if r["ema"] != "ordinary"), key=lambda r: r["sigma_rel"])
    ordinary = [r for r in results if r["ema"] == "ordinary"]
    print("| EMA | sigma_rel | gamma | relative residual | Frechet distance |")
    print("|---|---|---|---|---|")
    for r in posthoc:
        print(
            f"| post-hoc | {r['sigma_rel']} | {r['gamma']:.2f} | {r['relative_residual']:.4f} "
            f"| {r['fid']:.3f} |"
        )
    for r in ordinary:
        print(f"| decay {r['ema_decay']} | {r['sigma_rel']:.3f} | - | - | {r['fid']:.3f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(
        [r["sigma_rel"] for r in posthoc],
        [r["fid"] for r in posthoc],
        marker="o",
        label="post-hoc EMA",
    )
    for r in ordinary:
        ax.plot(
            r["sigma_rel"], r["fid"], "s", color="C3", label=f"training's EMA ({r['ema_decay']})"
        )
    ax.set(xscale="log", xlabel="sigma_rel (fraction of training)")
    ax.set_ylabel("Frechet distance (digits classifier)")
    ax.legend(fontsize=8)
    fig.suptitle(
        f"digits, step {results[0]['step']}, {results[0]['num_samples']} samples per point",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    print(f"plot: {args.plot}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", required=True, help="JSON lines file, appended to")
    parser.add_argument("--workdir", help="a run with post-hoc EMA snapshots; sweeps")
    parser.add_argument("--out_dir", help="where the reconstructions go")
    parser.add_argument("--reference_dir", default="", help="eval.reference_dir")
    parser.add_argument("--plot", help="instead of sweeping: print the table, draw this PNG")
    parser.add_argument("--sigma_rels", default="0.03,0.05,0.07,0.1,0.15,0.2")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=500)
    args = parser.parse_args(argv)
    args.sigma_rels = [float(s) for s in args.sigma_rels.split(",")]
    if args.plot:
        table_and_plot(args)
    elif args.workdir and args.out_dir:
        sweep(args)
    else:
        parser.error("give --workdir and --out_dir to sweep, or --plot")


if __name__ == "__main__":
    main()
