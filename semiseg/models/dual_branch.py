"""SWDBN's strong-weak dual-branch network: a backbone, a shared neck on c4, a strong and a weak branch.

Luo & Yang, ECCV 2020 (METHODS.md section 3): the strong branch learns from pixel labels, the weak branch from
proxy masks of weak labels, so inaccurate proxies shape the shared features without reaching the classifier that is
evaluated. model(x) is the strong branch, so evaluation, export and teachers never call the weak one.
"""

from __future__ import annotations

from torch import Tensor, nn

from semiseg.models.deeplab import conv_bn_relu
from semiseg.models.segmentor import InputNorm, upsample


def convs(in_ch: int, width: int, depth: int) -> nn.Sequential:
    """`depth` x [3x3 conv, BN, ReLU], the first from in_ch channels, the rest at `width`."""
    return nn.Sequential(*[conv_bn_relu(in_ch if i == 0 else width, width, 3) for i in range(depth)])


class Branch(nn.Module):
    """One SWDBN branch: depth x [3x3 conv, BN, ReLU], then a 1x1 classifier; logits at the feature stride."""

    def __init__(self, in_ch: int, width: int, depth: int, num_classes: int):
        super().__init__()
        self.convs = convs(in_ch, width, depth)
        self.classifier = nn.Conv2d(width if depth else in_ch, num_classes, 1)

    def forward(self, feat: Tensor) -> Tensor:
        return self.classifier(self.convs(feat))


class DualBranchNet(nn.Module):
    """Backbone, shared neck on c4, strong branch and (unless single-branch) weak branch.

    model(x)                      -> strong-branch logits (B, K, H, W): evaluation, export, teachers
    model.forward_branches(x, n)  -> (strong logits of x[:n], weak logits of x[n:]): the backbone and neck see the
                                     whole batch, each branch only its own part (the strong branch takes both
                                     parts when there is no weak branch)
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        width: int,
        neck_depth: int,
        branch_depth: int,
        dual=True,
        input_norm: InputNorm | None = None,
    ):
        super().__init__()
        self.input_norm = input_norm or InputNorm()
        c4 = backbone.channels[-1]
        self.backbone = backbone
        self.neck = convs(c4, width, neck_depth)
        ch = width if neck_depth else c4
        self.strong = Branch(ch, width, branch_depth, num_classes)
        self.weak = Branch(ch, width, branch_depth, num_classes) if dual else None

    def encode(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) uint8 or in [0, 1] -> shared neck features (B, D, h, w)."""
        return self.neck(self.backbone(self.input_norm(x))[-1])

    def forward(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) -> strong-branch logits (B, K, H, W)."""
        return upsample(self.strong(self.encode(x)), x.shape[-2:])

    def forward_branches(self, x: Tensor, n_strong: int) -> tuple[Tensor, Tensor]:
        """x (B, 3, H, W) -> (strong logits (n, K, H, W) of x[:n], weak-branch logits (B - n, K, H, W) of x[n:])."""
        feat, size = self.encode(x), x.shape[-2:]
        if self.weak is None:
            logits = upsample(self.strong(feat), size)
            return logits[:n_strong], logits[n_strong:]
        return upsample(self.strong(feat[:n_strong]), size), upsample(self.weak(feat[n_strong:]), size)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Encoder parameters: the base learning rate."""
        return list(self.backbone.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """Neck and branches: the learning rate times head_lr_mult."""
        backbone = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in backbone]
