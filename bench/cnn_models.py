"""The convolutional models of the benches: Opacus's CIFAR-10 example CNN and a WideResNet with
GroupNorm (De et al. 2022, "Unlocking high-accuracy differentially private image classification
through scale", train WRN-16-4 and deeper ones so), for bench/run.py's cnn: and wrn: setups."""

from torch import nn

from tests.models import opacus_cifar_cnn  # noqa: F401  (shared with tests/test_cnn.py)

CLASSES = 10


class WideBasic(nn.Module):
    """Pre-activation basic block: GN-ReLU-conv3x3(stride)-GN-ReLU-conv3x3, plus the input, or a
    1x1 convolution (stride) of the first activation where the shape changes."""

    def __init__(self, c_in, c_out, stride, groups):
        super().__init__()
        self.norm1, self.relu1 = nn.GroupNorm(groups, c_in), nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm2, self.relu2 = nn.GroupNorm(groups, c_out), nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        same = stride == 1 and c_in == c_out
        self.shortcut = None if same else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x):
        a = self.relu1(self.norm1(x))
        y = self.conv2(self.relu2(self.norm2(self.conv1(a))))
        return y + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko and Komodakis 2016) with GroupNorm(groups) for BatchNorm: a 3x3
    convolution to 16 channels, three stages of (depth - 4) / 6 WideBasic blocks of widths 16k,
    32k, 64k (strides 1, 2, 2), GN-ReLU, global average pooling, a linear head. WRN-16-4 (2.7 M
    parameters) is the one De et al. 2022 train on CIFAR-10."""

    def __init__(self, depth=16, k=4, classes=CLASSES, groups=16):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"a WideResNet's depth is 6n + 4 with n >= 1 (10, 16, 22, 28 ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * k, 32 * k, 64 * k]
        self.conv = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        blocks, c_in = [], widths[0]
        for stage, width in enumerate(widths[1:]):
            for i in range(n):
                blocks.append(WideBasic(c_in, width, 2 if stage and not i else 1, groups))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.norm, self.relu = nn.GroupNorm(groups, c_in), nn.ReLU()
        self.pool, self.flatten = nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten()
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.relu(self.norm(self.blocks(self.conv(x)))))))


def digits_cnn(classes=CLASSES):
    """A small CNN for scikit-learn's 8x8 digits ([N, 1, 8, 8]): a convolution, GroupNorm, a
    strided convolution, a linear head on the flattened 4x4x32 maps; 10 K parameters."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.GroupNorm(4, 16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, classes),
    )
