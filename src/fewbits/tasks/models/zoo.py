"""Architectures as users write them, with seeded random weights (nothing is downloaded): what
``benchmarks/reach.py`` quantizes and deploys to see how far fewbits reaches beyond its built-in
tasks.

Each entry of :data:`ZOO` builds a :class:`ZooCase`: the model in eval mode, batches to calibrate
and to measure on, and how its output is read (a tensor, or a Hugging Face output's logits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class ZooCase:
    name: str
    model: nn.Module
    batches: Callable[[int, int], list]  # (count, seed) → batches in call form (tensor or dict)
    note: str


# ---- vision ------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """torchvision's ResNet block: BatchNorm called in forward, a downsample Sequential."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout (stem, four stages of two BasicBlocks, global pool, fc)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths, cin, stages = (64, 128, 256, 512), 64, []
        for i, w in enumerate(widths):
            stages.append(nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w)))
            cin = w
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class ViT(nn.Module):
    """A small vision transformer: patch embedding, class token, pre-norm blocks with
    ``nn.MultiheadAttention``, classification head."""

    def __init__(self, size: int = 64, patch: int = 8, dim: int = 192, depth: int = 4, heads: int = 3,
                 classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class UNet(nn.Module):
    """A two-level U-Net: down by strided convolution, up by ``ConvTranspose2d``, skips by ``cat``."""

    def __init__(self, c: int = 32) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, 2, 1), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(2 * c, c, 2, 2)
        self.dec = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, 1, 1))

    def forward(self, x):
        e1 = self.enc1(x)
        m = self.mid(self.enc2(e1))
        return self.dec(torch.cat([self.up(m), e1], 1))


# ---- sequences -----------------------------------------------------------------------------------
class Functional(nn.Module):
    """Weights used functionally: ``F.linear`` with its own parameters and a ``torch.bmm``."""

    def __init__(self, dim: int = 256) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(dim, dim) / dim ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(dim))
        self.out = nn.Linear(dim, 16)

    def forward(self, x):
        h = F.gelu(F.linear(x, self.w1, self.b1))
        mixed = torch.bmm(torch.softmax(h @ h.transpose(1, 2) / 16, -1), h)
        return self.out(mixed.mean(1))


class LSTMClassifier(nn.Module):
    def __init__(self, dim: int = 128) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, 8)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class Encoder(nn.Module):
    def __init__(self, dim: int = 256, layers: int = 4) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(dim, 8)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1))


class Logits(nn.Module):
    """A Hugging Face causal LM's logits as one tensor (what the ONNX file returns)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits


def _randomized_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():  # trained-looking statistics, so folding is not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model


def _images(size: int, batch: int):
    return lambda n, seed: [torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed + i))
                            for i in range(n)]


def _sequences(length: int, dim: int, batch: int):
    return lambda n, seed: [torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(seed + i))
                            for i in range(n)]


def _tokens(length: int, vocab: int, batch: int):
    return lambda n, seed: [{"input_ids": torch.randint(0, vocab, (batch, length),
                                                        generator=torch.Generator().manual_seed(seed + i))}
                            for i in range(n)]


def _hf(kind: str) -> nn.Module:
    import transformers

    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=1000, n_positions=128, n_embd=256, n_layer=4, n_head=4,
                                         attn_implementation="eager")
        return Logits(transformers.GPT2LMHeadModel(config))
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      attn_implementation="eager")
    return Logits(transformers.LlamaForCausalLM(config))


def _case(name: str, build: Callable[[], nn.Module], batches, note: str) -> Callable[[], ZooCase]:
    def make() -> ZooCase:
        torch.manual_seed(0)
        return ZooCase(name, build().eval(), batches, note)
    return make


ZOO = {
    "resnet18": _case("resnet18", lambda: _randomized_bn(ResNet18()), _images(64, 8),
                      "torchvision-style ResNet-18, 64 px, batch 8"),
    "vit": _case("vit", ViT, _images(64, 8), "ViT, 8 px patches of 64 px, nn.MultiheadAttention, batch 8"),
    "transformer-encoder": _case("transformer-encoder", Encoder, _sequences(64, 256, 8),
                                 "nn.TransformerEncoder (4 layers, d 256), 64 tokens, batch 8"),
    "gpt2": _case("gpt2", lambda: _hf("gpt2"), _tokens(64, 1000, 4), "Hugging Face GPT-2 (4 layers, d 256), 64 tokens"),
    "llama": _case("llama", lambda: _hf("llama"), _tokens(64, 1000, 4),
                   "Hugging Face Llama (4 layers, d 256, GQA), 64 tokens"),
    "unet": _case("unet", UNet, _images(64, 4), "U-Net with ConvTranspose2d and skip cat, 64 px, batch 4"),
    "functional": _case("functional", Functional, _sequences(32, 256, 8), "F.linear and torch.bmm, 32 × 256"),
    "lstm": _case("lstm", LSTMClassifier, _sequences(32, 128, 8), "nn.LSTM and a linear head, 32 steps"),
}
