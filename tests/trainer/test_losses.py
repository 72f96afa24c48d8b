from __future__ import annotations

import pytest
import torch

from trainer.errors import ConfigError
from trainer.losses import BCTWeights, bct_losses, build_old_head, class_mean_embeddings, task_loss
from trainer.model import build_model


def _batches(n=64, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.arange(n) % classes
    return [(x[:32], y[:32]), (x[32:], y[32:])]


def test_synthesised_rows_are_the_old_class_means():
    torch.manual_seed(0)
    old = build_model("resnet", [0, 1, 2, 3, 4], width=8).eval().requires_grad_(False)
    classes = list(range(10))
    batches = _batches()
    means = class_mean_embeddings(old, batches, classes, 128)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        emb = old.embed(x)
    for c in classes:
        torch.testing.assert_close(means[c], emb[y == c].mean(0))
    head = build_old_head(old, classes, means)
    w = head.weight()
    torch.testing.assert_close(w[:5], old.head.weight)  # old classes keep the old rows
    torch.testing.assert_close(w[5:], means[5:])  # unseen classes get the mean old embedding


def test_bct_step_leaves_old_model_bit_identical_across_architectures():
    torch.manual_seed(0)
    old = build_model("resnet", [0, 1, 2, 3, 4], width=8, depth=1).eval().requires_grad_(False)
    new = build_model("resnet", list(range(10)), width=12, depth=2)  # a different, deeper, wider backbone
    before = {k: v.clone() for k, v in old.state_dict().items()}
    batches = _batches()
    means = class_mean_embeddings(old, batches, new.classes, 128)
    head = build_old_head(old, new.classes, means)
    head.train()  # a trainer calling .train() on everything must not unfreeze it
    assert not head.old.training
    opt = torch.optim.SGD(new.parameters(), lr=0.5)
    x, y = batches[0]
    emb, logits = new(x)
    rows = new.label_to_row(y)
    with torch.no_grad():
        old_emb = old.embed(x)
    terms = {
        "task": task_loss(logits, rows),
        **bct_losses(emb, rows, head, BCTWeights.recipe("full"), means, old_emb),
    }
    assert set(terms) == {"task", "influence", "to_class_mean", "to_old_embedding"}
    opt.zero_grad()
    sum(terms.values()).backward()
    assert all(p.grad is None for p in old.parameters())
    opt.step()
    for k, v in old.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert new.backbone.proj.weight.grad is not None


def test_bct_weights_refuse_what_would_train_nonsense():
    for bad in (dict(to_class_mean=-0.1), dict(pulls_on="new"), dict(influence_scale=0.0)):
        with pytest.raises(ConfigError):
            BCTWeights(**bad)


def test_plain_recipe_has_only_influence():
    assert BCTWeights.recipe("plain") == BCTWeights(influence=1.0, to_class_mean=0.0, to_old_embedding=0.0)


def test_pulls_on_old_classes_skip_images_of_classes_the_old_model_never_saw():
    torch.manual_seed(0)
    old = build_model("resnet", [0, 1, 2, 3, 4], width=8).eval().requires_grad_(False)
    classes = list(range(10))
    means = class_mean_embeddings(old, _batches(), classes, 128)
    head = build_old_head(old, classes, means)
    emb = torch.nn.functional.normalize(torch.randn(8, 128), dim=1)
    old_emb = torch.nn.functional.normalize(torch.randn(8, 128), dim=1)
    everywhere = BCTWeights(influence=1.0, to_class_mean=1.0, to_old_embedding=1.0)
    old_only = BCTWeights(influence=1.0, to_class_mean=1.0, to_old_embedding=1.0, pulls_on="old")
    new_rows = torch.tensor([5, 6, 7, 8, 9, 5, 6, 7])
    terms = bct_losses(emb, new_rows, head, old_only, means, old_emb)
    assert terms["to_class_mean"] == 0 and terms["to_old_embedding"] == 0 and terms["influence"] > 0
    assert bct_losses(emb, new_rows, head, everywhere, means, old_emb)["to_old_embedding"] > 0
    old_rows = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])  # only old classes: both scopes give the same terms
    a = bct_losses(emb, old_rows, head, old_only, means, old_emb)
    b = bct_losses(emb, old_rows, head, everywhere, means, old_emb)
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    # A mixed batch: the mean over the batch counts the skipped images as zeros.
    mixed = torch.tensor([0, 5, 1, 6, 2, 7, 3, 8])
    d = (emb - old_emb).pow(2).sum(1) * (mixed < 5)
    torch.testing.assert_close(
        bct_losses(emb, mixed, head, old_only, means, old_emb)["to_old_embedding"], d.mean()
    )


def _scattered_new_class(seed=0):
    """Old space (D=8): old classes on axes 0 and 1, each spread towards the other; the new class spreads over
    both, told apart only by a small offset on axis 2, so its mean direction ranks many old points first."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(300) % 3
    u, v, w = (torch.rand(300, generator=g) for _ in range(3))
    emb = torch.zeros(300, 8)
    emb[:, 0] = torch.where(rows == 0, 1.0, torch.where(rows == 1, u, 0.3 + 0.7 * v))
    emb[:, 1] = torch.where(rows == 1, 1.0, torch.where(rows == 0, u, 0.3 + 0.7 * w))
    emb[:, 2] = torch.where(rows == 2, 0.25, 0.0)
    emb += 0.03 * torch.randn(300, 8, generator=g)
    means = torch.stack([emb[rows == k].mean(0) for k in range(3)])
    return emb, rows, means, torch.tensor([False, False, True])


@pytest.mark.parametrize("mode", ["probe", "probe-old-head"])
def test_probe_rows_separate_a_new_class_better_than_its_mean_and_leave_old_classes(mode):
    from trainer.losses import probe_new_rows

    emb, rows, means, new = _scattered_new_class()
    out = probe_new_rows(emb, rows, means, new, mode, old_rows=means.clone(), old_scale=4.0)
    torch.testing.assert_close(out[:2], means[:2])  # old classes keep their targets
    assert torch.isclose(out[2].norm(), torch.tensor(1.0))

    def ap_of_new_class(direction):  # average precision of ranking every point by cosine to the direction
        order = torch.argsort(torch.nn.functional.normalize(emb, dim=1) @ direction, descending=True)
        hit = (rows[order] == 2).float()
        return float((hit.cumsum(0) / torch.arange(1, len(hit) + 1) * hit).sum() / hit.sum())

    assert ap_of_new_class(torch.nn.functional.normalize(means[2], dim=0)) < 0.9
    assert ap_of_new_class(out[2]) > 0.99
    again = probe_new_rows(emb, rows, means, new, mode, old_rows=means.clone(), old_scale=4.0)
    torch.testing.assert_close(out, again, rtol=0, atol=0)  # deterministic


def test_unknown_new_rows_mode_is_refused():
    from trainer.losses import probe_new_rows

    with pytest.raises(ConfigError, match="new-class rows"):
        BCTWeights(new_rows="median")
    emb, rows, means, new = _scattered_new_class()
    with pytest.raises(ConfigError, match="new-class rows"):
        probe_new_rows(emb, rows, means, new, "mean")
