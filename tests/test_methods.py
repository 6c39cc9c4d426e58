"""Contract tests over every method: one step on random batches, gradients, logs."""

import pytest
import torch

from semiseg.data.batch import Batch, LabeledBatch, UnlabeledBatch
from semiseg.data.datasets import dataset_info
from semiseg.engine.loop import Context, StepOut
from semiseg.methods import METHODS, load_config

SINGLE_STAGE = [name for name, m in METHODS.items() if hasattr(m, "train_step")]


def random_batch(info, n=2, size=32, seed=0, with_mix=False):
    g = torch.Generator().manual_seed(seed)
    img = lambda: torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)  # noqa: E731
    mask = torch.randint(0, info.num_classes, (n, size, size), generator=g)
    mask[:, :3] = 255
    pad = torch.zeros(n, size, size, dtype=torch.bool)
    pad[:, -4:] = True
    u = UnlabeledBatch(img(), pad, [f"u{i}" for i in range(n)], mask.clone())
    u_mix = UnlabeledBatch(img(), pad.clone(), [f"m{i}" for i in range(n)]) if with_mix else None
    return Batch(LabeledBatch(img(), mask, [f"l{i}" for i in range(n)]), u, u_mix)


VARIANTS = [(name, []) for name in SINGLE_STAGE] + [
    (name, ["method.joint_forward=false"]) for name in ("fixmatch", "unimatch")
]


@pytest.mark.parametrize(("name", "variant"), VARIANTS, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
@pytest.mark.parametrize("mix_partner", ["roll", "stream"])
def test_one_step_contract(name, variant, mix_partner, tiny_overrides):
    method = METHODS[name]
    cfg = load_config(None, tiny_overrides + [f"method.name={name}", f"train.mix_partner={mix_partner}", *variant])
    info = dataset_info(cfg.data)
    torch.manual_seed(0)
    nets = method.build(cfg, info)
    assert set(method.TRAINED) <= set(nets) and set(method.EVAL_NETS) <= set(nets)
    for net in nets.values():
        net.train()
    batch = random_batch(info, with_mix=mix_partner == "stream")
    ctx = Context(
        step=0, iters=10, gen=torch.Generator().manual_seed(0), info=info, device=torch.device("cpu"), config=cfg
    )
    out = method.train_step(nets, batch, cfg.method, ctx)
    assert isinstance(out, StepOut) and out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert "train/loss_x" in out.logs
    if "train/mask_ratio" in out.logs:
        assert 0 <= float(out.logs["train/mask_ratio"]) <= 1
    if method.USES_UNLABELED:
        assert len([k for k in out.logs if k.startswith("train/loss_")]) >= 2
    out.loss.backward()
    for net_name, net in nets.items():
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        if net_name in method.TRAINED:
            assert grads and all(torch.isfinite(g).all() for g in grads), net_name
            assert any(g.abs().sum() > 0 for g in grads), net_name
        else:
            assert not grads, f"{name}: untrained net {net_name} received gradients"
    for v in out.logs.values():
        assert not (isinstance(v, torch.Tensor) and v.requires_grad), "logs must be detached"


@pytest.mark.parametrize("name", ["fixmatch", "unimatch"])
def test_joint_forward_false_normalises_labeled_crops_among_themselves(name, tiny_overrides):
    # With two forwards the labeled loss is the supervised loss of the labeled batch alone; with one joint forward
    # BatchNorm's batch statistics include the unlabeled crops, so it differs.
    from semiseg.losses import ce

    method = METHODS[name]
    batch = None
    losses = {}
    for joint in (True, False):
        cfg = load_config(None, tiny_overrides + [f"method.name={name}", f"method.joint_forward={joint}"])
        info = dataset_info(cfg.data)
        torch.manual_seed(0)
        nets = {k: v.train() for k, v in method.build(cfg, info).items()}
        batch = batch or random_batch(info)
        ctx = Context(0, 10, torch.Generator().manual_seed(0), info, torch.device("cpu"), cfg)
        losses[joint] = float(method.train_step(nets, batch, cfg.method, ctx).logs["train/loss_x"])
        with torch.no_grad():
            alone = ce(nets["model"](batch.l.image), batch.l.mask)
    assert losses[False] == pytest.approx(float(alone), rel=1e-5)
    assert losses[True] != pytest.approx(float(alone), rel=1e-3)
