"""Sample quality and label agreement of guided sampling, from trained workdirs.

    python bench/guidance_quality.py --conditional=RUN_COND --unconditional=RUN \\
        --classifier=RUN_CLASSIFIER --results=guidance.jsonl --out_dir=/tmp/guided \\
        --reference_dir=/tmp/qs/ref
    python bench/guidance_quality.py --conditional=RUN_COND --cfg_scales 0 1 3 \\
        --interval 0.28 5.42 --interval_scales 1 3 --guide_step=500 --auto_scales 1 3 \\
        --num_steps=50 --results=schedules.jsonl --out_dir=/tmp/guided --reference_dir=/tmp/qs/ref
    python bench/guidance_quality.py --results=guidance.jsonl --table   # the Markdown table

Points: classifier-free guidance of the class-conditional run (``configs/digits_cond.py``)
at each ``--cfg_scales`` w (0 is plain conditional sampling), and with ``--interval LO HI``
only at the noise levels sigma / alpha in (LO, HI] (``sampling.guidance_interval``) at each
``--interval_scales`` w; with ``--guide_step``, autoguidance of that run by its own checkpoint
of that step (``sampling.guide_step``) at each ``--auto_scales`` w; and classifier guidance of
the unconditional run (``configs/digits.py``) by the noisy classifier
(``configs/digits_classifier.py``) at each ``--classifier_scales`` s (0 is unguided sampling,
with the labels assigned all the same, so its agreement is the chance level). Each point
generates ``--num_samples`` samples, every class in turn, with the run's sampler and
``eval.seed`` (the same noise for every point of a run), and scores them with the evaluation
program's ``fid`` mode: on the digits, the Fréchet distance of the digits classifier's
features to the train split, its Inception-style score, precision/recall, and how often that
classifier (trained apart from the generators, on the train split) names the requested label.
One JSON line per point is appended to ``--results``; points already there are skipped. The
workdirs' ``eval/`` is written: use copies of runs you must not touch.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import append_result, emit, read_results, sample_and_score  # noqa: E402

from diffusion_jax import xla_flags  # noqa: E402


def points(args) -> list[dict]:
    """Each point's ``run`` ("conditional" or "unconditional"), ``guidance``, ``scale``,
    ``interval`` (``[lo, hi]``, or ``[]`` for every level) and ``guide_step`` (autoguidance's,
    else 0)."""
    point = lambda run, guidance, scale, interval=(), guide_step=0: dict(
        run=run, guidance=guidance, scale=scale, interval=list(interval), guide_step=guide_step
    )
    chosen = [point("conditional", "classifier_free", w) for w in args.cfg_scales]
    if args.interval:
        chosen += [
            point("conditional", "classifier_free", w, args.interval) for w in args.interval_scales
        ]
    if args.guide_step:
        chosen += [
            point("conditional", "autoguidance", w, guide_step=args.guide_step)
            for w in args.auto_scales
        ]
    if args.unconditional:
        chosen += [point("unconditional", "classifier", s) for s in args.classifier_scales]
    return chosen


def _key(point: dict, num_steps: int) -> tuple:
    """What tells points apart (results from before intervals, guides and ``--num_steps``:
    every level, none, the run's sampler)."""
    return (
        point["run"],
        point["guidance"],
        point["scale"],
        tuple(point.get("interval", ())),
        point.get("guide_step", 0),
        point.get("num_steps", num_steps),
    )


def sweep(args):
    xla_flags.configure()  # as the evaluation program does, before JAX starts a backend
    workdirs = {"conditional": args.conditional, "unconditional": args.unconditional}
    done = {_key(r, 0) for r in read_results(args.results)}
    for point in points(args):
        if _key(point, args.num_steps) in done:
            continue
        run, guidance, scale = point["run"], point["guidance"], point["scale"]
        name = f"{run}_{guidance}_{scale:g}" + "".join(f"_{v:g}" for v in point["interval"])
        name += f"_guide{point['guide_step']}" if point["guide_step"] else ""
        name += f"_steps{args.num_steps}" if args.num_steps else ""
        overrides = {
            "sampling.guidance": guidance,
            "sampling.guidance_scale": scale,
            "sampling.guidance_interval": tuple(point["interval"]),
            "eval.sample_dir": os.path.join(args.out_dir, name),
            "eval.num_samples": args.num_samples,
            "eval.reference_dir": args.reference_dir,
        }
        if args.num_steps:
            overrides["sampling.num_steps"] = args.num_steps
        if guidance == "classifier":
            overrides["sampling.classifier_workdir"] = args.classifier
        if guidance == "autoguidance":
            overrides["sampling.guide_step"] = point["guide_step"]
        scores, sample_s = sample_and_score(workdirs[run], overrides)
        line = emit(
            bench="guidance_quality",
            **point,
            num_steps=args.num_steps,
            workdir=workdirs[run],
            num_samples=scores["num_samples"],
            fid=scores["fid"],
            inception_score=scores["inception_score"],
            precision=scores["precision"],
            recall=scores["recall"],
            label_agreement=scores["label_agreement"],
            label_agreement_by_class=scores["label_agreement_by_class"],
            feature_network=scores["feature_network"],
            sample_s=sample_s,
        )
        append_result(args.results, line)


def table(results: list[dict]) -> str:
    """The results as a Markdown table, one row per point: the points of a run, guidance,
    interval and guide together (in the order they first appear), by scale."""
    group = lambda r: (r["run"], r["guidance"], tuple(r.get("interval", ())), r.get("guide_step"))
    first = {}
    for i, r in enumerate(results):
        first.setdefault(group(r), i)
    results = sorted(results, key=lambda r: (first[group(r)], r["scale"]))
    rows = [
        "| model | guidance | scale | noise levels | FD (digits classifier) | IS | precision "
        "| recall | label agreement | sampling s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        guidance = r["guidance"]
        if r.get("guide_step"):
            guidance += f" (guide: step {r['guide_step']})"
        interval = r.get("interval")
        levels = f"({interval[0]:g}, {interval[1]:g}]" if interval else "all"
        rows.append(
            f"| {r['run']} | {guidance} | {r['scale']:g} | {levels} | {r['fid']:.2f} "
            f"| {r['inception_score']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} "
            f"| {r['label_agreement']:.3f} | {r['sample_s']:.0f} |"
        )
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conditional", help="workdir of a digits_cond.py run")
    parser.add_argument("--unconditional", help="workdir of a digits.py run (classifier guided)")
    parser.add_argument("--classifier", help="workdir of a digits_classifier.py run")
    parser.add_argument("--results", required=True, help="JSON lines, appended to")
    parser.add_argument("--out_dir", help="where each point's samples go")
    parser.add_argument("--reference_dir", default="", help="eval.reference_dir (cache)")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--num_steps", type=int, default=0, help="sampling.num_steps; 0: the run's")
    parser.add_argument("--cfg_scales", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    parser.add_argument("--classifier_scales", type=float, nargs="+", default=[0.0, 1.0, 3.0, 10.0])
    parser.add_argument(
        "--interval", type=float, nargs=2, metavar=("LO", "HI"), help="noise levels (LO, HI]"
    )
    parser.add_argument("--interval_scales", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--guide_step", type=int, default=0, help="autoguidance's checkpoint")
    parser.add_argument("--auto_scales", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--table", action="store_true", help="print the table of --results")
    args = parser.parse_args(argv)
    if args.table:
        print(table(read_results(args.results)))
        return
    if not (args.conditional and args.out_dir):
        parser.error("--conditional and --out_dir are required to run the sweep")
    if bool(args.unconditional) != bool(args.classifier):
        parser.error("--unconditional and --classifier go together")
    sweep(args)


if __name__ == "__main__":
    main()
