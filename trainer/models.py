"""Built-in models."""
from __future__ import annotations

import paddle
import paddle.nn.functional as F
from paddle import nn


class LeNet(nn.Layer):
    """The tutorial's LeNet: conv 6@5x5 pad 2, pool, conv 16@5x5, pool, 120, 84, classes."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2D(1, 6, kernel_size=5, stride=1, padding=2)
        self.pool1 = nn.MaxPool2D(kernel_size=2, stride=2)
        self.conv2 = nn.Conv2D(6, 16, kernel_size=5, stride=1)
        self.pool2 = nn.MaxPool2D(kernel_size=2, stride=2)
        self.linear1 = nn.Linear(16 * 5 * 5, 120)
        self.linear2 = nn.Linear(120, 84)
        self.linear3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool1(F.relu(self.conv1(x)))
        x = self.pool2(F.relu(self.conv2(x)))
        x = paddle.flatten(x, start_axis=1)
        x = F.relu(self.linear1(x))
        x = F.relu(self.linear2(x))
        return self.linear3(x)


def lenet(num_classes: int = 10) -> LeNet:
    return LeNet(num_classes=num_classes)
