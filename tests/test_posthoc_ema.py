"""Tests of post-hoc EMA (``diffusion_jax.posthoc_ema``): the sigma_rel <-> gamma map against
EDM2's numbers, the reconstruction on a synthetic random walk against power-function EMAs run
step by step, and the training program's profiles, snapshots, resume and the command on a tiny
digits run.

The random walk's EMAs are float64 recursions of ``beta_t = (1 - 1/t)^(gamma + 1)``, written
here apart from the library's ``update``.
"""

import os
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from diffusion_jax import config_lib, posthoc_ema, pretrained, sharding, train
from tests.test_train import (  # noqa: F401 (cache_dir: a fixture)
    REPO,
    _read_checkpoint,
    _steps,
    _tiny,
    cache_dir,
)

_WALK_STEPS, _WALK_EVERY, _STORED = 400, 20, (0.05, 0.1)


def _ema_trajectory(trajectory, gamma):
    """``[T, D]`` power-function EMAs (float64) after each step of ``trajectory`` ``[T, D]``
    (row ``t - 1`` holds the parameters after ``t`` updates)."""
    ema, out = np.zeros(trajectory.shape[1]), []
    for t, theta in enumerate(trajectory, start=1):
        beta = (1.0 - 1.0 / t) ** (gamma + 1.0)
        ema = beta * ema + (1.0 - beta) * theta
        out.append(ema)
    return np.stack(out)


@pytest.fixture(scope="module")
def walk():
    """A random walk of 8 parameters over ``_WALK_STEPS`` steps (with a drift, so that EMAs of
    different lengths differ clearly) and snapshots of the EMAs of ``_STORED`` every
    ``_WALK_EVERY`` steps: ``(trajectory, steps [N], sigma_rels [N], snapshots [N, 8])``."""
    rng = np.random.default_rng(0)
    trajectory = np.cumsum(rng.normal(size=(_WALK_STEPS, 8)) + 0.05, axis=0)
    emas = {s: _ema_trajectory(trajectory, posthoc_ema.sigma_rel_to_gamma(s)) for s in _STORED}
    steps = np.arange(_WALK_EVERY, _WALK_STEPS + 1, _WALK_EVERY)
    pairs = [(t, s) for t in steps for s in _STORED]
    snapshots = np.stack([emas[s][t - 1] for t, s in pairs])
    return trajectory, np.array([t for t, _ in pairs]), np.array([s for _, s in pairs]), snapshots


def test_sigma_rel_and_gamma_round_trip_and_edm2_values():
    """EDM2 quotes gamma 6.94 for sigma_rel 0.10 and 16.97 for 0.05; gamma is the largest root
    of the cubic (numpy's companion-matrix roots here) and sigma_rel is the profile's standard
    deviation over its length, by quadrature of ``(gamma + 1) s^gamma`` on [0, 1]."""
    assert posthoc_ema.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    assert posthoc_ema.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    sigmas = np.geomspace(0.005, posthoc_ema.MAX_SIGMA_REL, 25)
    gammas = posthoc_ema.sigma_rel_to_gamma(sigmas)
    np.testing.assert_allclose(posthoc_ema.gamma_to_sigma_rel(gammas), sigmas, rtol=1e-10)
    for sigma, gamma in zip(sigmas[:-1], gammas[:-1], strict=True):  # the last: a double root
        s = sigma**-2
        assert gamma == pytest.approx(np.roots([1, 7, 16 - s, 12 - s]).real.max(), rel=1e-9)
    s = (np.arange(200_000) + 0.5) / 200_000
    for gamma in (-0.3, 0.0, 6.94, 16.97):
        p = (gamma + 1) * s**gamma
        mean = np.mean(p * s)
        std = np.sqrt(np.mean(p * s**2) - mean**2)
        assert posthoc_ema.gamma_to_sigma_rel(gamma) == pytest.approx(std, rel=1e-4)
    assert posthoc_ema.sigma_rel_to_gamma(posthoc_ema.MAX_SIGMA_REL) == pytest.approx(
        (np.sqrt(5) - 3) / 2, abs=1e-6
    )


def test_update_is_the_power_function_ema():
    """``update`` at steps 1..300 (float32, as in the train step) against the float64 recursion:
    step 1 takes the parameters whole, and the late steps' ``1 - beta`` keeps its digits."""
    trajectory = np.random.default_rng(1).normal(size=(300, 3))
    gamma = float(posthoc_ema.sigma_rel_to_gamma(0.05))
    ema = np.full(3, 1e3, np.float32)  # the initial value gets weight 0
    for t, theta in enumerate(trajectory, start=1):
        ema = posthoc_ema.update(ema, np.float32(theta), t, gamma)
    np.testing.assert_allclose(ema, _ema_trajectory(trajectory, gamma)[-1], rtol=0, atol=2e-6)


def test_reconstructing_a_stored_profile_returns_its_snapshot(walk):
    """(a) The stored profiles' own sigma_rel at their own steps: coefficient 1 on that snapshot
    (and ~0 elsewhere), so the combination is the snapshot to round-off, in float64 and as the
    float32 parameters the command reads."""
    _, steps, sigmas, snapshots = walk
    for step, sigma in ((_WALK_STEPS, 0.1), (_WALK_STEPS // 2, 0.05)):
        keep = steps <= step
        coefficients, residual = posthoc_ema.solve(steps[keep], sigmas[keep], step, sigma)
        [index] = np.flatnonzero((steps == step) & (sigmas == sigma))
        np.testing.assert_allclose(coefficients, np.eye(keep.sum())[index], rtol=0, atol=1e-9)
        assert residual < 1e-6
        combined = posthoc_ema.combine(list(snapshots[keep]), coefficients)
        np.testing.assert_allclose(combined, snapshots[index], rtol=1e-9, atol=1e-9)
        as_float32 = posthoc_ema.combine(list(snapshots[keep].astype(np.float32)), coefficients)
        assert as_float32.dtype == np.float32
        np.testing.assert_allclose(as_float32, snapshots[index], rtol=3e-7, atol=1e-5)


@pytest.mark.parametrize("sigma", [0.035, 0.07, 0.15, 0.2])
def test_other_sigma_rel_matches_the_ema_run_with_it(walk, sigma):
    """(b) Against the EMA of ``sigma`` run step by step over the same walk. The tolerance: the
    discrete EMAs are the continuous profiles applied to the walk held constant between steps,
    and the combination's coefficients sum to 1 like the profile's weights, so the error of
    parameter j is ``integral r(s) (theta_j(s) - c_j) ds`` for the residual profile ``r`` and
    any constant ``c_j``: at most ``|r| |theta_j - mean theta_j|`` (Cauchy-Schwarz, L2 over
    [0, T]); over the 8 parameters, the norm of those. Measured: the error is 0.04-0.12 of that
    bound, 0.001-0.025 of what the choice of length changes (the distance between the EMAs of
    ``sigma`` and of the nearest stored profile), and the bound itself 0.04-0.6 of that change,
    so the test fails a reconstruction that returned the nearest stored profile. ``|r|``
    (from ``solve``'s closed forms) is checked against a quadrature of the profiles."""
    trajectory, steps, sigmas, snapshots = walk
    gamma = posthoc_ema.sigma_rel_to_gamma(sigma)
    target = _ema_trajectory(trajectory, gamma)[-1]
    coefficients, residual = posthoc_ema.solve(steps, sigmas, _WALK_STEPS, sigma)
    combined = posthoc_ema.combine(list(snapshots), coefficients)

    s = (np.arange(400_000) + 0.5) / 400_000 * _WALK_STEPS
    profile = lambda t, g: np.where(s <= t, (g + 1) * s**g / float(t) ** (g + 1), 0.0)
    r = sum(
        c * profile(t, posthoc_ema.sigma_rel_to_gamma(x))
        for c, t, x in zip(coefficients, steps, sigmas, strict=True)
    ) - profile(_WALK_STEPS, gamma)
    ds = _WALK_STEPS / s.size
    r_norm = np.sqrt(np.sum(r**2) * ds)
    target_norm = np.sqrt(np.sum(profile(_WALK_STEPS, gamma) ** 2) * ds)
    assert residual == pytest.approx(r_norm / target_norm, rel=1e-3)

    bound = r_norm * np.linalg.norm(trajectory - trajectory.mean(axis=0))
    assert np.linalg.norm(combined - target) <= bound
    nearest = min(_STORED, key=lambda stored: abs(np.log(stored / sigma)))
    nearest_ema = snapshots[(steps == _WALK_STEPS) & (sigmas == nearest)][0]
    assert bound < np.linalg.norm(target - nearest_ema)


def test_range_and_bad_sigma_rel(walk):
    """The reconstructable range is where the residual meets ``MAX_RELATIVE_RESIDUAL``, around
    the stored profiles; beyond ``MAX_SIGMA_REL`` there is no profile at all."""
    _, steps, sigmas, _ = walk
    lowest, highest = posthoc_ema.reconstructable_range(steps, sigmas, _WALK_STEPS)
    assert 0.02 < lowest < 0.05 and 0.1 < highest < posthoc_ema.MAX_SIGMA_REL
    for edge in (lowest, highest):
        inside = posthoc_ema.solve(steps, sigmas, _WALK_STEPS, edge)[1]
        outside = posthoc_ema.solve(
            steps, sigmas, _WALK_STEPS, edge * (1.002 if edge > 0.1 else 0.998)
        )[1]
        assert inside <= posthoc_ema.MAX_RELATIVE_RESIDUAL < outside


@pytest.mark.parametrize(
    "stds", [(0.05, 0.05), (0.0,), (0.31,), ("0.1",), (True,)], ids=lambda s: repr(s)
)
def test_bad_posthoc_ema_stds(stds):
    config = _tiny(**{"training.posthoc_ema_stds": stds})
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(config)
    assert str(error.value).startswith("Config key 'training.posthoc_ema_stds' is ")
    assert "\n" not in str(error.value)


def test_resume_refuses_other_profiles_and_allows_another_cadence():
    recorded = _tiny(**{"training.posthoc_ema_stds": (0.05, 0.1)})
    config_lib.check_resume(
        recorded,
        _tiny(**{"training.posthoc_ema_stds": (0.05, 0.1), "training.posthoc_ema_every": 7}),
        "run",
    )
    with pytest.raises(
        config_lib.ConfigError, match=r"training.posthoc_ema_stds \[0.05, 0.1\] -> \[\]"
    ):
        config_lib.check_resume(recorded, _tiny(), "run")


# The tiny run: 4 steps, a snapshot of each profile every step, checkpoints at steps 2 and 4.
_RUN = {
    "training.num_steps": 4,
    "training.checkpoint_every": 2,
    "training.posthoc_ema_stds": (0.05, 0.1),
    "training.posthoc_ema_every": 1,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory, request):
    request.getfixturevalue("cache_dir")  # the compiled step, shared with the resumed run
    workdir = tmp_path_factory.mktemp("posthoc_run")
    train.train_and_evaluate(_tiny(**_RUN), workdir)
    assert _steps(workdir) == [2, 4]
    return workdir


def _snapshot(workdir, step, sigma):
    return posthoc_ema.read_snapshot(posthoc_ema.snapshot_path(workdir, step, sigma))


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_train_step_moves_each_profile_by_its_beta(run):
    """(d) Snapshot at step t = beta_t x snapshot at t - 1 + (1 - beta_t) x the parameters
    after t updates (checkpoints 2 and 4), with beta_t = (1 - 1/t)^(gamma + 1) in float64; the
    checkpointed profiles are the snapshots of their step."""
    for step in (2, 4):
        state, _ = _read_checkpoint(run, step)
        for k, sigma in enumerate(_RUN["training.posthoc_ema_stds"]):
            beta = (1 - 1 / step) ** (posthoc_ema.sigma_rel_to_gamma(sigma) + 1)
            expected = jax.tree_util.tree_map(
                lambda e, p, b=beta: b * np.float64(e) + (1 - b) * np.float64(p),
                _snapshot(run, step - 1, sigma),
                state["params"],
            )
            chex.assert_trees_all_close(_snapshot(run, step, sigma), expected, rtol=1e-6, atol=1e-9)
            chex.assert_trees_all_equal(state["posthoc_ema"][k], _snapshot(run, step, sigma))


@pytest.mark.slow  # a second training run (10-20 s): CI's slow pass
def test_resume_continues_the_profiles_and_rewrites_no_snapshot(run, tmp_path):
    """(e) A run killed after step 3 (checkpoint 2, snapshots 1-3) resumes to the straight run's
    state at step 4, profiles included, writes snapshot 4 equal to the straight run's and leaves
    the snapshots it finds untouched (same inode and modification time)."""
    workdir = tmp_path / "run"
    shutil.copytree(run / "checkpoints" / "2", workdir / "checkpoints" / "2")
    shutil.copy(run / "config.json", workdir / "config.json")
    (workdir / posthoc_ema.SNAPSHOT_DIR).mkdir()
    kept = {}
    for step in (1, 2, 3):
        for sigma in _RUN["training.posthoc_ema_stds"]:
            path = posthoc_ema.snapshot_path(workdir, step, sigma)
            shutil.copy2(posthoc_ema.snapshot_path(run, step, sigma), path)
            kept[path] = (os.stat(path).st_ino, os.stat(path).st_mtime_ns)

    train.train_and_evaluate(_tiny(**_RUN), workdir)

    expected, _ = _read_checkpoint(run, 4)
    resumed, _ = _read_checkpoint(workdir, 4)
    chex.assert_trees_all_equal(expected, resumed, strict=True)
    assert {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in kept} == kept
    for sigma in _RUN["training.posthoc_ema_stds"]:
        chex.assert_trees_all_equal(_snapshot(workdir, 4, sigma), _snapshot(run, 4, sigma))


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_command_writes_the_reconstruction_where_the_evaluation_reads(run, tmp_path):
    """(f) The command (a subprocess) writes a workdir whose checkpoint's EMA parameters, as the
    evaluation program restores them, are the snapshots combined by ``solve``'s coefficients,
    under the run's config; the reconstruction at another step joins it there."""
    sigma, out = 0.07, tmp_path / "reconstructed"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffusion_jax.posthoc_ema",
            f"--workdir={run}",
            f"--sigma_rel={sigma}",
            "--step=3",
            f"--out={out}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert f"-> {out}" in result.stdout

    listed = [(t, s) for t, s, _ in posthoc_ema.list_snapshots(run) if t <= 3]
    coefficients, _ = posthoc_ema.solve(*zip(*listed, strict=True), 3, sigma)
    expected = posthoc_ema.combine([_snapshot(run, t, s) for t, s in listed], coefficients)
    config, step = pretrained.load_config(out, None)
    assert step == 3 and config.to_dict() == pretrained.load_config(run, None)[0].to_dict()
    _, params, _ = pretrained.restore_ema(config, out, step, sharding.make_mesh())
    chex.assert_trees_all_close(jax.device_get(params), expected, rtol=1e-6, atol=1e-7)

    # Another step's reconstruction goes next to it; the one that exists stays as it is.
    before = sorted((p, p.stat().st_mtime_ns) for p in (out / "checkpoints").rglob("*"))
    posthoc_ema.reconstruct(run, sigma, step=3, out=out)
    assert sorted((p, p.stat().st_mtime_ns) for p in (out / "checkpoints").rglob("*")) == before
    posthoc_ema.reconstruct(run, sigma, step=4, out=out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["3", "4"]


@pytest.mark.slow  # moved out of the default suite (10-minute budget): CI's slow pass
def test_command_refuses_in_one_line(run, tmp_path):
    """A sigma_rel the snapshots cannot reconstruct, a step without snapshots, a workdir
    without any: one line each, nothing written."""
    with pytest.raises(config_lib.ConfigError) as error:
        posthoc_ema.reconstruct(run, 0.01, out=tmp_path / "out")
    assert str(error.value).startswith(
        "--sigma_rel=0.01 is not reconstructed by the 8 snapshots up to step 4 (relative "
        "residual of its profile "
    )
    assert "; they reconstruct [0.0" in str(error.value)
    with pytest.raises(config_lib.ConfigError, match=r"^--sigma_rel=0.5 is not .* profile inf >"):
        posthoc_ema.reconstruct(run, 0.5, out=tmp_path / "out")
    with pytest.raises(config_lib.ConfigError) as error:
        posthoc_ema.reconstruct(run, 0.07, step=5, out=tmp_path / "out")
    assert str(error.value) == "--step=5 has no post-hoc EMA snapshots; snapshot steps: 1, 2, 3, 4"
    with pytest.raises(config_lib.ConfigError, match="^No post-hoc EMA snapshots in "):
        posthoc_ema.reconstruct(tmp_path, 0.07)
    assert not (tmp_path / "out").exists()
