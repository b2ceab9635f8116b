"""The evaluation program's modes, one module each: ``bpd``, ``samples``, ``fid``, ``figures``.

Each has ``run(context) -> dict`` (the numbers ``evaluate`` writes to
``DIR/eval/<mode>_step<N>.json``) and ``summary(result) -> str`` (its one-line report).
"""
