"""pacl_masks / pacl_loss against a brute-force per-anchor reference written from SPEC's table."""

from __future__ import annotations

import math

import pytest
import torch

from pacl_ray.core.loss import PACLLoss, clip_loss, pacl_loss, pacl_masks, phase_partitions


# --------------------------------------------------------------------------- reference


def _argmax_lowest(values: list[float]) -> int:
    best = 0
    for k, v in enumerate(values):
        if v > values[best]:
            best = k
    return best


def reference(sim, code, f, e, tau):
    """Loops over anchors and candidates in float64, straight from SPEC "Masks and loss"."""
    n = len(code)
    s = [[float(sim[i][j]) for j in range(n)] for i in range(n)]
    lv = [_argmax_lowest([s[i][k] for k in range(n)]) for i in range(n)]  # best text of image i
    lt = [_argmax_lowest([s[k][i] for k in range(n)]) for i in range(n)]  # best image of text i

    def m_f(i):  # images v_j factually like text i's best image
        return {j for j in range(n) if f[j] == f[lt[i]]}

    def m_f_inv(i):  # texts t_j whose best image is factually like image i
        return {j for j in range(n) if f[i] == f[lt[j]]}

    def m_e(i):  # texts t_j emotionally like image i's best text
        return {j for j in range(n) if e[j] == e[lv[i]]}

    def m_e_inv(i):  # images v_j whose best text is emotionally like text i
        return {j for j in range(n) if e[i] == e[lv[j]]}

    pos_i, neg_i, pos_t, neg_t = [], [], [], []
    for i in range(n):
        others = {j for j in range(n) if j != i}
        c = code[i]
        if c == 1:
            pi, qi, pt, qt = {i}, others, {i}, others
        elif c == 2:
            pi, qi, pt, qt = {i}, others - m_f_inv(i), {i}, others - m_f(i)
        elif c == 3:
            pi, qi, pt, qt = {i}, others - m_e(i), {i}, others - m_e_inv(i)
        else:
            pi, qi = {lv[i]}, others - m_f_inv(i) - m_e(i)
            pt, qt = {lt[i]}, others - m_f(i) - m_e_inv(i)
        pos_i.append(pi)
        neg_i.append(qi - pi)
        pos_t.append(pt)
        neg_t.append(qt - pt)

    per_anchor = []
    for i in range(n):
        num_v = sum(math.exp(s[i][j] / tau) for j in pos_i[i])
        den_v = sum(math.exp(s[i][j] / tau) for j in pos_i[i] | neg_i[i])
        num_t = sum(math.exp(s[j][i] / tau) for j in pos_t[i])
        den_t = sum(math.exp(s[j][i] / tau) for j in pos_t[i] | neg_t[i])
        per_anchor.append(-0.5 * math.log(num_v / den_v) - 0.5 * math.log(num_t / den_t))
    losses = {}
    for k in (1, 2, 3, 4):
        members = [per_anchor[i] for i in range(n) if code[i] == k]
        losses[f"L{k}"] = sum(members) / len(members) if members else 0.0
    masks = (pos_i, neg_i, pos_t, neg_t)
    return masks, losses


def _as_sets(mask: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row).flatten().tolist()) for row in mask]


def random_batch(n, d, k, seed, dtype=torch.float64, quantize=False):
    g = torch.Generator().manual_seed(seed)
    zv = torch.randn(n, d, generator=g, dtype=dtype)
    zt = torch.randn(n, d, generator=g, dtype=dtype)
    if quantize:  # coarse values make ties in the argmax likely
        zv, zt = zv.sign(), zt.sign()
    zv = torch.nn.functional.normalize(zv, dim=1)
    zt = torch.nn.functional.normalize(zt, dim=1)
    code = torch.randint(1, 5, (n,), generator=g)
    f = torch.randint(0, k, (n,), generator=g)
    e = torch.randint(0, k, (n,), generator=g)
    return zv, zt, code, f, e


# --------------------------------------------------------------------------- masks and loss


CASES = [(n, k, seed) for n in (1, 2, 3, 5, 8, 17, 33, 64) for k in (1, 2, 3, 6) for seed in (0, 1)]


@pytest.mark.parametrize("n,k,seed", CASES)
def test_masks_and_loss_match_reference(n, k, seed):
    zv, zt, code, f, e = random_batch(n, 8, k, seed, quantize=(seed == 1))
    tau = 0.1
    sim = zv @ zt.T
    masks = pacl_masks(sim, code, f, e)
    ref_masks, ref_losses = reference(sim.tolist(), code.tolist(), f.tolist(), e.tolist(), tau)
    for got, want in zip(masks, ref_masks):
        assert got.dtype == torch.bool and got.shape == (n, n)
        assert _as_sets(got) == want
    out = pacl_loss(zv, zt, code, f, e, tau)
    for key, want in ref_losses.items():
        assert out[key].item() == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert out["total"].item() == pytest.approx(sum(ref_losses.values()), rel=1e-9, abs=1e-12)


def test_ties_resolve_to_lowest_index():
    # Every similarity equal: the best partner of everyone is index 0.
    n = 4
    sim = torch.zeros(n, n, dtype=torch.float64)
    code = torch.full((n,), 4)
    labels = torch.arange(n)
    pos_i, _, pos_t, _ = pacl_masks(sim, code, labels, labels)
    assert torch.equal(pos_i.nonzero()[:, 1], torch.zeros(n, dtype=torch.long))
    assert torch.equal(pos_t.nonzero()[:, 1], torch.zeros(n, dtype=torch.long))


def test_masks_structure_random():
    zv, zt, code, f, e = random_batch(40, 16, 3, seed=5)
    pos_i, neg_i, pos_t, neg_t = pacl_masks(zv @ zt.T, code, f, e)
    for pos, neg in ((pos_i, neg_i), (pos_t, neg_t)):
        assert torch.all(pos.sum(1) == 1)
        assert not torch.any(pos & neg)
        assert not torch.any(neg.diagonal())


# --------------------------------------------------------------------------- closed forms


def test_all_strong_equals_symmetric_infonce():
    zv, zt, _, f, e = random_batch(32, 16, 2, seed=3)
    code = torch.ones(32, dtype=torch.long)
    out = pacl_loss(zv, zt, code, f, e, 0.07)
    assert out["L1"].item() == pytest.approx(clip_loss(zv, zt, 0.07).item(), rel=1e-10)
    assert out["total"].item() == pytest.approx(out["L1"].item(), rel=1e-12)
    for k in (2, 3, 4):
        assert out[f"L{k}"].item() == 0.0


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_identical_features_give_log_n(n):
    z = torch.nn.functional.normalize(torch.ones(n, 5, dtype=torch.float64), dim=1)
    code = torch.ones(n, dtype=torch.long)
    labels = torch.zeros(n, dtype=torch.long)
    out = pacl_loss(z, z, code, labels, labels, 0.5)
    assert out["L1"].item() == pytest.approx(math.log(n), abs=1e-12)


def test_weak_anchor_with_itself_as_argmax_is_strong_minus_excluded_negatives():
    # Anchor 0 is weak-coupled and its own best partner in both directions.
    n, tau = 6, 0.2
    g = torch.Generator().manual_seed(11)
    zv = torch.nn.functional.normalize(torch.randn(n, 4, generator=g, dtype=torch.float64), dim=1)
    zt = zv.clone()
    zt[1:] = torch.nn.functional.normalize(torch.randn(n - 1, 4, generator=g, dtype=torch.float64), dim=1)
    sim = zv @ zt.T
    assert sim[0].argmax() == 0 and sim[:, 0].argmax() == 0
    f = torch.tensor([0, 0, 1, 1, 0, 1])
    e = torch.tensor([0, 1, 1, 0, 1, 0])
    code = torch.tensor([4, 1, 1, 1, 1, 1])
    out = pacl_loss(zv, zt, code, f, e, tau)

    # Closed form: the strong-coupled loss over the candidates that survive the exclusions.
    lt = sim.argmax(0)
    lv = sim.argmax(1)
    keep_text = [j for j in range(n) if j == 0 or (f[0] != f[lt[j]] and e[j] != e[lv[0]])]
    keep_image = [j for j in range(n) if j == 0 or (f[j] != f[lt[0]] and e[0] != e[lv[j]])]
    assert len(keep_text) < n or len(keep_image) < n  # something is excluded
    image_term = -torch.log_softmax(sim[0, keep_text] / tau, 0)[0]
    text_term = -torch.log_softmax(sim[keep_image, 0] / tau, 0)[0]
    assert out["L4"].item() == pytest.approx(0.5 * (image_term + text_term).item(), rel=1e-12)


def test_empty_partitions_are_zero_and_active_selects_terms():
    zv, zt, _, f, e = random_batch(10, 8, 2, seed=2)
    code = torch.tensor([1, 1, 2, 2, 2, 3, 3, 1, 2, 3])
    out = pacl_loss(zv, zt, code, f, e, 0.07, active=(1,))
    assert out["L4"].item() == 0.0
    assert out["total"].item() == pytest.approx(out["L1"].item())
    out = pacl_loss(zv, zt, code, f, e, 0.07, active=(1, 2, 3))
    assert out["total"].item() == pytest.approx((out["L1"] + out["L2"] + out["L3"]).item())


# --------------------------------------------------------------------------- gradients, dtypes


def test_gradcheck_float64():
    zv, zt, code, f, e = random_batch(6, 4, 2, seed=7)
    zv.requires_grad_(True)
    zt.requires_grad_(True)

    def total(a, b):
        return pacl_loss(a, b, code, f, e, 0.3)["total"]

    assert torch.autograd.gradcheck(total, (zv, zt), eps=1e-6, atol=1e-6)


def test_gradient_flows_with_empty_partition():
    zv, zt, _, f, e = random_batch(5, 4, 2, seed=8)
    zv.requires_grad_(True)
    code = torch.ones(5, dtype=torch.long)
    pacl_loss(zv, zt, code, f, e, 0.1)["total"].backward()
    assert torch.isfinite(zv.grad).all() and zv.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    zv, zt, code, f, e = random_batch(16, 8, 2, seed=4, dtype=torch.float32)
    ref = pacl_loss(zv.to(dtype).float(), zt.to(dtype).float(), code, f, e, 0.07)
    out = pacl_loss(zv.to(dtype), zt.to(dtype), code, f, e, 0.07)
    assert out["total"].dtype == torch.float32
    assert out["total"].item() == pytest.approx(ref["total"].item(), rel=1e-6)


def test_large_logits_are_stable():
    zv, zt, code, f, e = random_batch(64, 8, 3, seed=9, dtype=torch.float32)
    out = pacl_loss(zv, zt, code, f, e, 0.001)  # logits up to 1000
    assert all(torch.isfinite(v) for v in out.values())


def test_invalid_inputs_raise():
    zv, zt, code, f, e = random_batch(4, 4, 2, seed=0)
    with pytest.raises(ValueError, match="1-4"):
        pacl_loss(zv, zt, torch.tensor([1, 2, 5, 1]), f, e, 0.1)
    with pytest.raises(ValueError, match="shape"):
        pacl_masks(zv @ zt.T, code[:3], f, e)
    with pytest.raises(ValueError, match="active"):
        pacl_loss(zv, zt, code, f, e, 0.1, active=(0,))


def test_module_matches_function():
    zv, zt, code, f, e = random_batch(12, 6, 2, seed=12)
    module_out = PACLLoss(0.07)(zv, zt, code, f, e)
    assert module_out["total"].item() == pacl_loss(zv, zt, code, f, e, 0.07)["total"].item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    zv, zt, code, f, e = random_batch(64, 32, 3, seed=13, dtype=torch.float32)
    cpu = pacl_loss(zv, zt, code, f, e, 0.07)["total"].item()
    gpu = pacl_loss(zv.cuda(), zt.cuda(), code.cuda(), f.cuda(), e.cuda(), 0.07)["total"].item()
    assert gpu == pytest.approx(cpu, rel=1e-5)


# --------------------------------------------------------------------------- schedule


def test_progressive_phases_by_thirds():
    assert [phase_partitions(ep, 30) for ep in (0, 9, 10, 19, 20, 29)] == [
        (1,), (1,), (1, 2, 3), (1, 2, 3), (1, 2, 3, 4), (1, 2, 3, 4)
    ]
    # E not divisible by 3: epoch < E/3 and epoch < 2E/3 exactly.
    assert [phase_partitions(ep, 4) for ep in range(4)] == [(1,), (1,), (1, 2, 3), (1, 2, 3, 4)]
    assert [phase_partitions(ep, 1) for ep in range(1)] == [(1,)]
    assert phase_partitions(3, 9, "all") == (1, 2, 3, 4)
    with pytest.raises(ValueError):
        phase_partitions(9, 9)
