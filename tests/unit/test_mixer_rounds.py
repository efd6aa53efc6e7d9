"""The Mixer object (no Ray): rounds from several workers, in whatever order the calls arrive."""

from __future__ import annotations

import asyncio

import numpy as np

from rnb_ray.balance.mixer import Mixer, MixerSpec


def _mixer(tmp_path, workers: int = 2) -> Mixer:
    spec = MixerSpec(run_dir=str(tmp_path), domains=["a", "b", "c"], strategy="rnb", options={"lam": 3.0},
                     sizes=[10, 10, 10], q=[1 / 3] * 3, floor=0.0, num_workers=workers, lam=3.0)
    return Mixer(spec)


def _payload(seed: int) -> dict:
    """A round's terms as the workers send them (already reduced among themselves)."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(3, 8))
    return {"counts": np.array([2, 3, 4]), "present": np.ones(3, dtype=bool), "gram": g @ g.T}


def test_a_workers_next_round_waits_for_the_others_current_round(tmp_path):
    """With ``stale``, worker 0's round 1 can reach the mixer before worker 1's round 0 (Ray does not order
    calls from different callers). It must wait for round 0, not fail the run."""
    async def scenario(m: Mixer):
        r0_w0 = asyncio.create_task(m.submit(0, 0, 5, _payload(0)))
        r1_w0 = asyncio.create_task(m.submit(0, 1, 10, _payload(1)))  # arrives early
        await asyncio.sleep(0.01)
        assert not r0_w0.done() and not r1_w0.done() and m.round == 0
        r0_w1 = asyncio.create_task(m.submit(1, 0, 5, _payload(2)))
        first = await asyncio.gather(r0_w0, r0_w1)
        assert m.round == 1 and not r1_w0.done()  # round 1 still needs worker 1
        second = await asyncio.gather(r1_w0, m.submit(1, 1, 10, _payload(3)))
        return first, second

    first, second = asyncio.run(scenario(_mixer(tmp_path)))
    assert first[0]["round"] == first[1]["round"] == 0 and first[0]["mixture"] == first[1]["mixture"]
    assert second[0]["round"] == second[1]["round"] == 1


def test_same_rounds_in_order_give_the_same_trajectory(tmp_path):
    """Arrival order does not change the result: in-order and early-arrival runs agree exactly."""
    async def in_order(m: Mixer):
        for r in range(2):
            await asyncio.gather(m.submit(0, r, 5 * (r + 1), _payload(2 * r)),
                                 m.submit(1, r, 5 * (r + 1), _payload(2 * r + 1)))

    async def early(m: Mixer):
        a = asyncio.create_task(m.submit(0, 0, 5, _payload(0)))
        b = asyncio.create_task(m.submit(0, 1, 10, _payload(2)))
        await asyncio.sleep(0)
        await asyncio.gather(a, m.submit(1, 0, 5, _payload(1)))
        await asyncio.gather(b, m.submit(1, 1, 10, _payload(3)))

    m1, m2 = _mixer(tmp_path / "1"), _mixer(tmp_path / "2")
    asyncio.run(in_order(m1))
    asyncio.run(early(m2))
    assert m1.round == m2.round == 2
    np.testing.assert_array_equal(m1.p, m2.p)
    assert m1.trajectory == m2.trajectory


def test_a_retried_round_returns_its_recorded_result(tmp_path):
    m = _mixer(tmp_path, workers=1)
    first = asyncio.run(m.submit(0, 0, 5, _payload(0)))
    again = asyncio.run(m.submit(0, 0, 5, _payload(9)))
    assert again["mixture"] == first["mixture"] and m.round == 1


def test_a_restarted_mixer_continues_from_its_saved_state(tmp_path):
    """A killed mixer actor is recreated by Ray with the same spec: it reloads RUN/mixer/state.pt (now only
    p, the trajectory and the strategy's small state — no gradients) and answers the next round the same."""
    a = _mixer(tmp_path / "a", workers=1)
    asyncio.run(a.submit(0, 0, 5, _payload(0)))
    restarted = _mixer(tmp_path / "a", workers=1)  # the same run directory: a restart
    assert restarted.restarted and restarted.round == 1 and restarted.trajectory == a.trajectory
    np.testing.assert_array_equal(restarted.p, a.p)
    assert restarted.state_path.stat().st_size < 10_000
    nxt_a = asyncio.run(a.submit(0, 1, 10, _payload(1)))
    nxt_b = asyncio.run(restarted.submit(0, 1, 10, _payload(1)))
    assert nxt_a["mixture"] == nxt_b["mixture"]
