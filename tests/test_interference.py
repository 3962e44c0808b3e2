"""Other processes' share of the machine, and the training time they cannot inflate."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from src import interference as I


def _snap(wall, busy, steal, total, own, cpus=2):
    return I.Snapshot(wall, busy, steal, total, cpus, own)


def test_between_separates_our_cpu_time_from_the_others():
    # 10 s of wall on 2 CPUs = 20 CPU-seconds; the machine was busy 16 of them, 9 were ours, 1 stolen.
    out = I.between(_snap(0, 100, 5, 1000, 50), _snap(10, 116, 6, 1020, 59))
    assert out["wall_s"] == 10 and out["own_cpu_s"] == 9
    assert out["others_cpu_share"] == pytest.approx(7 / 20) and out["steal_share"] == pytest.approx(1 / 20)
    assert out["busy"] is True
    quiet = I.between(_snap(0, 100, 5, 1000, 50), _snap(10, 119, 5, 1020, 68))
    assert quiet["others_cpu_share"] == pytest.approx(1 / 20) and quiet["busy"] is False


def test_unreadable_proc_stat_gives_no_share_rather_than_a_made_up_one(tmp_path):
    snap = I.snapshot(tmp_path / "missing")
    assert snap.busy_s is None
    out = I.between(snap, I.snapshot(tmp_path / "missing"))
    assert out["others_cpu_share"] is None and out["busy"] is None


def test_proc_stat_is_read_in_clock_ticks(tmp_path):
    import os

    hz = os.sysconf("SC_CLK_TCK")
    stat = tmp_path / "stat"
    stat.write_text(f"cpu  {3 * hz} 0 {hz} {10 * hz} {hz} 0 0 {2 * hz} 0 0\ncpu0 1 2 3\ncpu1 1 2 3\nintr 5\n")
    snap = I.snapshot(stat)
    assert (snap.busy_s, snap.steal_s, snap.total_s, snap.cpus) == (4.0, 2.0, 17.0, 2)


def test_a_competing_process_shows_up_as_the_others_share():
    """A real CPU-bound process that is not ours (not waited for while measured)."""
    before = I.snapshot()
    burner = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<2.5: pass"])
    try:
        time.sleep(2.0)
        after = I.snapshot()
    finally:
        burner.wait()
    out = I.between(before, after)
    # one busy CPU of this machine's CPUs, less start-up time
    assert out["others_cpu_share"] > 0.5 / out["cpus"], out
    assert out["own_cpu_s"] < 0.5


def test_robust_train_time_ignores_steps_a_neighbour_slowed():
    tokens = [1000, 2000, 1000, 3000, 1000, 2000, 1000]
    quiet = [t / 200 for t in tokens]                 # 200 tokens/s throughout
    assert I.robust_train_s(quiet, tokens) == pytest.approx(sum(quiet))
    slowed = list(quiet)
    slowed[1] *= 3                                    # a neighbour took two steps' CPU
    slowed[4] *= 2
    assert sum(slowed) > 1.4 * sum(quiet)
    assert I.robust_train_s(slowed, tokens) == pytest.approx(sum(quiet))
    assert I.robust_train_s([], []) is None


def test_a_neighbour_covering_most_steps_is_seen_through_the_quiet_steps():
    """A neighbour that slowed 5 of 7 steps moves the plain median; the quiet steps do not move."""
    tokens = [1000, 2000, 1000, 3000, 1000, 2000, 1000]
    quiet_s = [t / 200 for t in tokens]
    slowed = [s * (1.8 if i >= 2 else 1.0) for i, s in enumerate(quiet_s)]
    assert I.robust_train_s(slowed, tokens) > 1.5 * sum(quiet_s)       # no step is known quiet: median of all
    mask = [i < 2 for i in range(7)]
    assert I.robust_train_s(slowed, tokens, mask) > 1.5 * sum(quiet_s)  # 2 quiet steps are too few to trust
    mask = [i < 3 or i == 6 for i in range(7)]
    slowed[6] = quiet_s[6]
    assert I.robust_train_s(slowed, tokens, mask) == pytest.approx(sum(quiet_s))


def test_each_step_gets_the_share_of_the_samples_around_it():
    # Samples each second on 2 CPUs (2 CPU-s per second); ours used 1 CPU-s per second throughout,
    # another process used the second CPU from t=4 to t=8.
    busy = [0, 1, 2, 3, 4, 6, 8, 10, 12, 13, 14]
    samples = [_snap(t, busy[t], 0, 2 * t, t) for t in range(11)]
    step_end, step_s = [2.0, 4.0, 6.0, 8.0, 10.0, 12.0], [2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    shares = I.step_shares(samples, step_end, step_s)
    assert shares[:5] == pytest.approx([0.0, 0.0, 0.5, 0.5, 0.0]) and shares[5] is None  # past the last sample
    assert I.quiet_steps(shares) == [True, True, False, False, True, False]
    # A step between two samples is measured over the samples that enclose it.
    assert I.step_shares(samples, [5.5], [1.0]) == pytest.approx([0.5])
    steal = [_snap(t, t, t, 2 * t + t, t) for t in range(3)]  # a third of the time stolen by the hypervisor
    assert I.step_shares(steal, [2.0], [2.0]) == pytest.approx([1 / 3])


def test_the_sampler_brackets_what_it_measures():
    with I.Sampler(interval_s=0.01) as sampler:
        time.sleep(0.1)
    walls = [s.wall_s for s in sampler.samples]
    assert len(walls) >= 3 and walls == sorted(walls)
    assert not sampler._thread.is_alive()
