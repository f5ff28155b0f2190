import torch

from speccascade_fast import rng


def test_torch_hash_matches_pure_python_bits():
    seeds = [0, 1, -1, 2**62, -(2**63), 123456789]
    for seed in seeds:
        for pos in [0, 1, 7, 2**40]:
            for stream in (rng.DRAFT, rng.ACCEPT, rng.RESIDUAL):
                idx = torch.tensor([0, 1, 5, 262143])
                got = rng.uniform(torch.tensor(seed), torch.tensor(pos), stream, idx)
                want = [rng.uniform_int(seed, pos, stream, int(i)) for i in idx]
                assert got.tolist() == want


def test_uniforms_are_open_interval_and_roughly_uniform():
    u = rng.uniform(torch.arange(200)[:, None], torch.tensor(3), rng.DRAFT, torch.arange(500))
    assert u.dtype == torch.float64
    assert bool((u > 0).all()) and bool((u < 1).all())
    assert abs(u.mean().item() - 0.5) < 0.005
    hist = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert bool(((hist - 0.1).abs() < 0.01).all())


def test_streams_positions_and_seeds_give_distinct_numbers():
    base = rng.uniform(torch.tensor(1), torch.tensor(2), rng.DRAFT, 0)
    assert base != rng.uniform(torch.tensor(1), torch.tensor(2), rng.ACCEPT, 0)
    assert base != rng.uniform(torch.tensor(1), torch.tensor(3), rng.DRAFT, 0)
    assert base != rng.uniform(torch.tensor(2), torch.tensor(2), rng.DRAFT, 0)
    assert base != rng.uniform(torch.tensor(1), torch.tensor(2), rng.DRAFT, 1)


def test_race_ties_and_zero_weights():
    noise = torch.ones(1, 4)
    assert rng.race(torch.log(torch.tensor([[0.0, 0.5, 0.5, 0.0]])), noise).item() == 1
    assert rng.race(torch.log(torch.tensor([[0.0, 0.0, 0.0, 1.0]])), torch.rand(1, 4)).item() == 3


def test_extreme_bits_stay_inside_the_open_interval():
    u = rng.unit_interval(torch.tensor([0, (1 << 52) - 1], dtype=torch.int64))
    assert 0 < u[0].item() < 1e-15 and u[1].item() < 1.0
    assert 1 - u[1].item() > 0
