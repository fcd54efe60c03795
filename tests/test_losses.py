import math

import torch
import torch.nn.functional as F

from cicl.model.losses import code_cluster_loss, code_instance_loss, ntxent, paper_cluster_loss


def _views(b=8, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = F.normalize(torch.randn(b, d, generator=g), dim=1)
    z2 = F.normalize(torch.randn(b, d, generator=g), dim=1)
    return z1, z2


def brute_paper(z1, z2, lab, tau):
    """The printed formula, literally: l(z_i) and l(z'_i), averaged over 2B."""
    b = len(lab)
    total, count = 0.0, 0
    for a_view, o_view in ((z1, z2), (z2, z1)):
        for i in range(b):
            num = den = 0.0
            for j in range(b):
                s_o = math.exp(float(a_view[i] @ o_view[j]) / tau)
                s_s = math.exp(float(a_view[i] @ a_view[j]) / tau)
                if lab[j] == lab[i]:
                    num += s_o + (s_s if j != i else 0.0)
                else:
                    den += s_o + s_s
            total += -math.log(num / den)
            count += 1
    return total / count


def test_paper_cluster_loss_matches_formula():
    z1, z2 = _views()
    lab = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])
    got = paper_cluster_loss(z1, z2, lab, 0.5)
    assert abs(float(got) - brute_paper(z1, z2, lab, 0.5)) < 1e-5


def test_paper_cluster_loss_skips_anchors_without_negatives():
    z1, z2 = _views()
    lab = torch.zeros(8, dtype=torch.long)
    assert float(paper_cluster_loss(z1, z2, lab, 0.5)) == 0.0


def test_paper_cluster_loss_ignores_invalid_cells():
    z1, z2 = _views()
    lab = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])
    valid = torch.tensor([1, 1, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    got = paper_cluster_loss(z1, z2, lab, 0.5, valid)
    keep = valid.nonzero().flatten()
    ref = brute_paper(z1[keep], z2[keep], lab[keep], 0.5)
    assert abs(float(got) - ref) < 1e-5


def brute_code(z1, z2, lab, tau):
    b = len(lab)
    z = torch.cat([z1, z2])
    labs = torch.cat([lab, lab])
    total = 0.0
    for c in lab.unique():
        anchors = [a for a in range(2 * b) if labs[a] == c]
        s = 0.0
        for a in anchors:
            twin = a + b if a < b else a - b
            pos = math.exp(float(z[a] @ z[twin]) / tau)
            neg = sum(math.exp(float(z[a] @ z[n]) / tau) for n in range(2 * b) if labs[n] != c)
            s += -math.log(pos / (pos + neg))
        total += s / len(anchors)
    return total


def test_code_cluster_loss_matches_loop():
    z1, z2 = _views(seed=1)
    lab = torch.tensor([0, 1, 1, 2, 0, 2, 1, 0])
    assert abs(float(code_cluster_loss(z1, z2, lab, 0.5)) - brute_code(z1, z2, lab, 0.5)) < 1e-5


def test_paper_and_code_losses_differ():
    z1, z2 = _views(seed=2)
    lab = torch.tensor([0, 1, 1, 2, 0, 2, 1, 0])
    assert (
        abs(
            float(paper_cluster_loss(z1, z2, lab, 0.5)) - float(code_cluster_loss(z1, z2, lab, 0.5))
        )
        > 0.1
    )


def test_ntxent_matches_loop():
    z1, z2 = _views(seed=3)
    b, tau = z1.shape[0], 0.5
    z = torch.cat([z1, z2])
    ref = 0.0
    for a in range(2 * b):
        twin = a + b if a < b else a - b
        den = sum(math.exp(float(z[a] @ z[j]) / tau) for j in range(2 * b) if j != a)
        ref += -math.log(math.exp(float(z[a] @ z[twin]) / tau) / den)
    assert abs(float(ntxent(z1, z2, tau)) - ref / (2 * b)) < 1e-5


def test_code_instance_is_one_directional():
    z1, z2 = _views(seed=4)
    a = float(code_instance_loss(z1, z2, 0.5))
    b = float(code_instance_loss(z2, z1, 0.5))
    assert a != b
    ref = (
        sum(
            -math.log(
                math.exp(float(z1[i] @ z2[i]) / 0.5)
                / sum(math.exp(float(z1[i] @ z2[j]) / 0.5) for j in range(8))
            )
            for i in range(8)
        )
        / 8
    )
    assert abs(a - ref) < 1e-5


def test_student_t_kernel_similarity_is_euclidean():
    from cicl.model.losses import similarity

    a = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    s = similarity(a, a, "student_t")
    assert torch.allclose(s, -torch.log1p(torch.tensor([[0.0, 25.0], [25.0, 0.0]])))


def test_losses_backpropagate():
    z1, z2 = _views()
    z1.requires_grad_(True)
    lab = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])
    (ntxent(z1, z2, 0.5) + paper_cluster_loss(z1, z2, lab, 0.5)).backward()
    assert z1.grad is not None and torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0
