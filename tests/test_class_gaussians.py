"""Class Gaussians for classifier alignment: every storage option samples the covariance it claims."""
import pytest
import torch

from cilbench.methods.common.class_gaussians import RIDGE, ClassGaussians


def data(n_classes=4, per_class=30, dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_classes, dim, dim, generator=g) * 0.5       # anisotropic classes
    x = torch.randn(n_classes, per_class, dim, generator=g) @ mix + torch.randn(n_classes, 1, dim, generator=g) * 3
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    return x.reshape(-1, dim), labels


def sample_cov(x):
    return torch.cov(x.T) + RIDGE * torch.eye(x.shape[1])


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_covariance_keeps_only_the_cholesky_factor(dtype):
    x, y = data()
    g = ClassGaussians(12, "covariance", dtype=dtype)
    g.fit(range(0, 4), x, y, 0)
    tol = 1e-5 if dtype == "float32" else 2e-2
    for c in range(4):
        torch.testing.assert_close(g.means[c], x[y == c].mean(0))
        torch.testing.assert_close(g.covariance(c), sample_cov(x[y == c]), rtol=tol, atol=tol)
    assert g.nbytes() == 4 * 12 * 4 + 4 * 12 * 12 * (4 if dtype == "float32" else 2) + 4 * 4


def test_lowrank_is_exact_when_classes_have_few_samples_and_pca_otherwise():
    x, y = data(per_class=6)                         # rank of a class covariance <= 5
    g = ClassGaussians(12, "lowrank", rank=5)
    g.fit(range(0, 4), x, y, 0)
    for c in range(4):
        torch.testing.assert_close(g.covariance(c), sample_cov(x[y == c]), rtol=1e-4, atol=1e-4)
    x, y = data(per_class=40)
    g = ClassGaussians(12, "lowrank", rank=3)
    g.fit(range(0, 4), x, y, 0)
    cov = sample_cov(x[y == 0]) - RIDGE * torch.eye(12)
    lam, vec = torch.linalg.eigh(cov)
    approx = g.covariance(0)
    top = vec[:, -3:]
    torch.testing.assert_close(top.T @ approx @ top, torch.diag(lam[-3:]) + RIDGE * torch.eye(3),
                               rtol=1e-4, atol=1e-4)           # the top directions are kept exactly
    torch.testing.assert_close(approx.trace(), cov.trace() + 12 * RIDGE, rtol=1e-4, atol=1e-4)  # total variance kept


def test_shared_covariance_pools_all_finished_tasks_and_refits_the_current_one():
    x, y = data()
    g = ClassGaussians(12, "shared")
    g.fit(range(0, 2), x[y < 2], y[y < 2], 0)
    g.fit(range(0, 2), x[y < 2], y[y < 2], 0)           # the second stage refits, it does not double count
    g.fit(range(2, 4), x[y >= 2], y[y >= 2], 1)
    xc = torch.cat([x[y == c] - x[y == c].mean(0) for c in range(4)])
    pooled = xc.T @ xc / (len(x) - 4) + RIDGE * torch.eye(12)
    torch.testing.assert_close(g.covariance(3), pooled, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["covariance", "variance", "lowrank", "shared"])
def test_samples_follow_the_stored_gaussian(kind):
    x, y = data(per_class=50)
    g = ClassGaussians(12, kind, rank=4)
    g.fit(range(0, 4), x, y, 0)
    torch.manual_seed(0)
    draws = g.sample(g.means * 0.5, 20000, chunk=3)  # means may be rescaled (CaRE's decay)
    assert draws.shape == (4, 20000, 12)
    for c in range(4):
        cov = g.covariance(c)
        sd = cov.diagonal().sqrt()
        n = draws.shape[1]
        # within 5 standard errors: se(mean_i) = sd_i/√n, se(cov_ij) <= sd_i·sd_j·√(2/n)
        assert ((draws[c].mean(0) - g.means[c] * 0.5).abs() < 5 * sd / n ** 0.5).all()
        assert ((torch.cov(draws[c].T) - cov).abs() < 5 * torch.outer(sd, sd) * (2 / n) ** 0.5).all()


def test_state_round_trip():
    x, y = data()
    g = ClassGaussians(12, "lowrank", rank=3, dtype="float16")
    g.fit(range(0, 4), x, y, 0)
    h = ClassGaussians(12, "lowrank", rank=3, dtype="float16")
    h.load_state_dict(g.state_dict())
    for c in range(4):
        torch.testing.assert_close(h.covariance(c), g.covariance(c))
