"""DFST (Cheng et al., "Deep Feature Space Trojan Attack of Neural Networks by Controlled Detoxification",
AAAI 2021): the trigger is a style transformation, and detoxification pushes the backdoor into deep features.

Trigger. A style generator G turns an image into a "sunrise" version of itself; the poisoned image is
x' = (1 − α)·x + α·G(x) (the PyTorch reference's transparency α = 0.6), rounded to uint8. A ``poison_rate``
share of every training batch is replaced by styled images with the target label (the reference's 5% of
every batch).

Detoxification. After training epochs (``--detox-start``, then every ``--detox-every``; the reference: after
every epoch) the attacker
1. samples ``detox_rate`` of its non-target images (the reference: 3% of the training batches) and finds the
   "compromised" neurons: the ``detox_neuron_ratio`` share (at least one) of the channels of ``detox_layer``
   (ResNet's ``layer4``) whose mean activation rises most from the clean images to their styled versions;
2. trains a fresh feature injector F (``detox_epochs`` epochs, Adam lr ``injector_lr``, betas (0.5, 0.9), batch
   128) with the classifier frozen, on d = (1 − α)·x + α·F(x), to minimise
   CE(f(d), target) − ``detox_weight``·(mean activation of the compromised channels) − ``ssim_weight``·SSIM(d, x)
   + 10·relu(``ssim_bound`` − SSIM(d, x));
3. from then on a further ``poison_rate`` share of every batch is replaced by injector outputs with their TRUE
   labels, so that the simple features F can produce stop leading to the target and the backdoor has to
   live in the deeper features of the style.
Every injector output is projected onto SSIM(d, x) ≥ ``ssim_bound``: d is pulled towards x along the segment
between them (per image, a vectorised bisection) until the bound holds, so the bound is an invariant and not
just a penalty. The injector (ours, after the reference's simplified one): a per-pixel linear map (1×1
convolution, initialised to the identity) of the image and its 11×11 local maximum, minimum and mean, clamped
to [0, 1].

Defaults and sources (Megum1/DFST, PyTorch branch, ``configs/dfst.json`` and its code, unless said):
poison rate 0.05 per batch, α 0.6, detox layer ``layer4``, neuron ratio 0.01, 10 injector epochs, SSIM weight
0.1, detox weight 0.3, injector Adam lr 1e-2 with betas (0.5, 0.9), 3% of the training data per
detoxification, detoxification after every epoch (detox start 1, every 1), as many detox images per batch as
poisons; SSIM bound 0.6 (the TensorFlow branch's ``detoxification.py``, which penalises SSIM < 0.6 with
``tf.image.ssim``: the same SSIM as :mod:`data.attacks.ssim`). The style generator's fit (300 Adam steps, lr
1e-2, batches of 64) and the sunrise style itself are ours.

Differences from the paper and the reference code:
- Style generator. The paper's is a CycleGAN trained on sunrise photographs (the PyTorch reference uses a
  pre-trained arbitrary-image-stylisation model with a sunrise style image); neither can be fetched here. Ours
  is a small convolutional network (two 3×3 layers of 16 channels, a 1×1 output, sigmoid; the pixel
  coordinates as two extra input channels so it can place a glow), fitted at prepare time on the attacker's
  own training images to a fixed sunrise-like target: the luminance, mixed 70/30 with a warm glow centred
  near the bottom of the image, through a gradient map deep violet → crimson → orange → pale gold (for one
  channel: those colours' grey levels), plus a content term (L1 between the luminance gradients of G(x) and
  of x, weight 0.2) that keeps the edges. The trigger is G's output, not the closed-form target: G's own
  smoothing and errors are part of it, as a GAN generator's are. ``--style-generator PATH`` takes trained
  weights instead (a ``state()``-style dict with keys ``style.*``, G's bare ``state_dict``, or a DFST
  ``trigger_info.th``). G's weights go into the trigger info (tensors only).
- Injector objective. The reference computes the classifier's outputs under ``torch.no_grad()`` and subtracts
  torchgeometry's SSIM *loss* ((1 − SSIM)/2), so its injector only learns to move away from its input; we
  follow the paper (gradients through the frozen classifier to the injector, similarity rewarded, the
  TensorFlow branch's SSIM ≥ 0.6 enforced).
- Neuron ranking on the same images clean and styled (paired), instead of two different samples.
- The poisoned share of a batch is its first images, whatever their class (the reference draws pre-styled
  non-target images); a styled target-class image labelled with the target teaches the same rule.
- The reference trains 200 epochs; the toolkit's short runs keep its every-epoch schedule, so a 4-epoch run
  detoxifies after epochs 1–4 (the last one is unused: the hook cannot know it is the last).
- All-to-all (y → y + 1 mod C) is offered too; the paper is all-to-one.

Example::

    attack = create_attack("dfst", target=0, num_classes=10, image_shape=(28, 28, 1))
    attack.prepare(images, labels, None, normalize, generator)      # fits the style generator
    hook = attack.training_hook(attack.poison(images, labels, generator), device, normalize)
    # per batch: hook(model, images, labels, index); per epoch: attack.epoch_hook(model, epoch, ...)
    poisoned_images, targets, true_labels = attack.test_set(test_images, test_labels)   # uint8 N×H×W×C
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from utils.checkpoint import safe_load
from utils.errors import OptionError

from .base import Attack, AttackError, Option, PoisonedSet, register, to_uint8
from .ssim import ssim

# The sunrise style: gradient-map stops (tone in [0, 1]) and their RGB colours in [0, 1].
SUNRISE_STOPS = (0.0, 0.35, 0.65, 1.0)
SUNRISE_COLOURS = ((0.10, 0.05, 0.20), (0.60, 0.15, 0.25), (0.95, 0.45, 0.15), (1.00, 0.90, 0.60))
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 luminance weights
GLOW_CENTRE, GLOW_WIDTH, GLOW_SHARE = (0.85, 0.5), 0.35, 0.3  # (row, column) as fractions of the image
CONTENT_WEIGHT = 0.2  # the style fit's edge-keeping term
STYLE_WIDTH, STYLE_BATCH, STYLE_LR = 16, 64, 1e-2
INJECTOR_WINDOW = 11  # the reference's FeatureInjector window
DETOX_BATCH = 128  # the reference's batch size
SSIM_PENALTY = 10.0  # weight of relu(bound − SSIM) while the injector trains (the projection enforces it after)
PROJECTION_STEPS = 10  # bisection steps: the blend weight to within 2^-10
STYLE_PREFIX = "style."


def luminance(x01: torch.Tensor) -> torch.Tensor:
    """N×C×H×W in [0, 1] -> N×1×H×W: BT.601 luminance for RGB, the channel mean otherwise."""
    if x01.shape[1] == 3:
        return (x01 * torch.tensor(LUMA, device=x01.device, dtype=x01.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return x01.mean(1, keepdim=True)


def coordinates(x01: torch.Tensor) -> torch.Tensor:
    """N×2×H×W: each pixel's row and column as fractions in [0, 1] (top-left 0)."""
    n, _, h, w = x01.shape
    rows = torch.linspace(0, 1, h, device=x01.device, dtype=x01.dtype).view(1, 1, h, 1).expand(n, 1, h, w)
    cols = torch.linspace(0, 1, w, device=x01.device, dtype=x01.dtype).view(1, 1, 1, w).expand(n, 1, h, w)
    return torch.cat([rows, cols], 1)


def sunrise_style(x01: torch.Tensor) -> torch.Tensor:
    """The style target the generator is fitted to: the image's tone (luminance with a warm glow near the
    bottom) through the sunrise gradient map. N×C×H×W in [0, 1] -> the same shape."""
    n, c, h, w = x01.shape
    where = coordinates(x01)
    glow = torch.exp(-((where[:, :1] - GLOW_CENTRE[0]) ** 2 + (where[:, 1:] - GLOW_CENTRE[1]) ** 2)
                     / (2 * GLOW_WIDTH ** 2))
    tone = ((1 - GLOW_SHARE) * luminance(x01) + GLOW_SHARE * glow).clamp(0, 1)
    colours = torch.tensor(SUNRISE_COLOURS, device=x01.device, dtype=x01.dtype)
    if c != 3:  # grey images: the palette's grey levels in every channel
        colours = (colours @ torch.tensor(LUMA, device=x01.device, dtype=x01.dtype)).view(-1, 1).expand(-1, c)
    # Piecewise-linear gradient map: the first colour plus each segment's share of its colour step.
    out = colours[0].view(1, c, 1, 1).expand(n, c, h, w)
    for k in range(len(SUNRISE_STOPS) - 1):
        step = ((tone - SUNRISE_STOPS[k]) / (SUNRISE_STOPS[k + 1] - SUNRISE_STOPS[k])).clamp(0, 1)
        out = out + step * (colours[k + 1] - colours[k]).view(1, c, 1, 1)
    return out


def edge_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between the luminance gradients (finite differences) of two image batches."""
    la, lb = luminance(a), luminance(b)
    dy = (la.diff(dim=2) - lb.diff(dim=2)).abs().mean()
    dx = (la.diff(dim=3) - lb.diff(dim=3)).abs().mean()
    return dx + dy


class StyleGenerator(nn.Module):
    """Image -> styled image in [0, 1]: two 3×3 convolutions and a 1×1 output on the image plus its pixel
    coordinates (so that a position-dependent glow is learnable by a fully convolutional net)."""

    def __init__(self, channels: int, width: int = STYLE_WIDTH):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels + 2, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, channels, 1))

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(torch.cat([x01, coordinates(x01) * 2 - 1], 1)))


class FeatureInjector(nn.Module):
    """Per-pixel linear map of the image and its local maximum, minimum and mean (a ``window``-wide square),
    clamped to [0, 1]; starts as the identity."""

    def __init__(self, channels: int, window: int = INJECTOR_WINDOW):
        super().__init__()
        self.window = window
        self.mix = nn.Conv2d(4 * channels, channels, 1)
        with torch.no_grad():
            self.mix.weight.zero_()
            self.mix.bias.zero_()
            self.mix.weight[:, :channels, 0, 0] = torch.eye(channels)

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        k = min(self.window, *x01.shape[-2:])
        k -= 1 - k % 2  # odd, so the output keeps the input's size
        local_max = F.max_pool2d(x01, k, 1, k // 2)
        local_min = -F.max_pool2d(-x01, k, 1, k // 2)
        local_mean = F.avg_pool2d(x01, k, 1, k // 2, count_include_pad=False)
        return self.mix(torch.cat([x01, local_max, local_min, local_mean], 1)).clamp(0, 1)


def project_ssim(x: torch.Tensor, d: torch.Tensor, bound: float, steps: int = PROJECTION_STEPS) -> torch.Tensor:
    """x + t·(d − x) per image, with t = 1 where d meets SSIM(·, x) ≥ ``bound``, else the feasible end of a
    bisection on [0, 1] (t = 0, x itself, is always feasible, so the result always meets the bound)."""
    def blend(t):
        return x + t.view(-1, 1, 1, 1) * (d - x)

    lo = (ssim(d, x) >= bound).to(x.dtype)  # a feasible t per image
    hi = torch.ones_like(lo)
    for _ in range(steps):
        mid = (lo + hi) / 2
        feasible = ssim(blend(mid), x) >= bound
        lo, hi = torch.where(feasible, mid, lo), torch.where(feasible, hi, mid)
    return blend(lo)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or float pixel values) N×H×W×C -> float N×C×H×W in [0, 1]."""
    return images.permute(0, 3, 1, 2).float() / 255


def to_pixels(x01: torch.Tensor) -> torch.Tensor:
    """float N×C×H×W in [0, 1] -> float pixel values N×H×W×C."""
    return (x01 * 255).permute(0, 2, 3, 1)


@register
class DFST(Attack):
    name = "dfst"
    paper = "Cheng et al., Deep Feature Space Trojan Attack of Neural Networks by Controlled Detoxification, AAAI 2021"
    learns_trigger = True  # poisoned per batch; the fitted style generator exists only in the trigger info
    target_types = ("all2one", "all2all")
    options = {
        "poison_rate": Option(0.05, float, "share of every training batch styled and relabelled (as many detox "
                                           "images, labels kept, once an injector is trained)"),
        "style_alpha": Option(0.6, float, "opacity of the style: x' = (1 - alpha)·x + alpha·G(x)"),
        "style_generator": Option(None, str, "trained style generator weights (a DFST trigger_info.th or the "
                                             "generator's state_dict) instead of fitting one"),
        "style_steps": Option(300, int, "Adam steps fitting the style generator to the sunrise style", low=1),
        "detox_layer": Option("layer4", str, "model stage searched for compromised channels (default: layer4, "
                                             "or the last block before pooling where there is none)"),
        "detox_neuron_ratio": Option(0.01, float, "share of the layer's channels taken as compromised (at least one)"),
        "detox_rate": Option(0.03, float, "share of the attacker's images used by each detoxification"),
        "detox_epochs": Option(10, int, "feature-injector epochs per detoxification", low=1),
        "detox_start": Option(1, int, "first training epoch after which detoxification runs", low=1),
        "detox_every": Option(1, int, "detoxification every this many epochs from --detox-start", low=1),
        "ssim_weight": Option(0.1, float, "weight of SSIM(detox image, input) in the injector's loss", low=0),
        "detox_weight": Option(0.3, float, "weight of the compromised channels' activation in the injector's loss",
                               low=0),
        "injector_lr": Option(1e-2, float, "Adam learning rate of the feature injector", low=0),
        "ssim_bound": Option(0.6, float, "lowest SSIM of a detox image to its input (enforced by projection)"),
    }

    # --- construction -----------------------------------------------------------------------
    def networks(self) -> None:
        with torch.random.fork_rng(devices=[]):  # fixed initial weights, the global RNG untouched
            torch.manual_seed(0)
            self.style_net = StyleGenerator(self.image_shape[2])
        self.device = torch.device("cpu")
        self.injector: FeatureInjector | None = None
        self.detox_seed = 0
        self.last_detox: dict = {}

    def build(self) -> None:
        if not 0 < self.opts["style_alpha"] <= 1:
            raise AttackError("style_alpha", f"{self.opts['style_alpha']} is outside (0, 1]")
        if not 0 < self.opts["detox_neuron_ratio"] <= 1:
            raise AttackError("detox_neuron_ratio", f"{self.opts['detox_neuron_ratio']} is outside (0, 1]")
        if not 0 <= self.opts["ssim_bound"] < 1:
            raise AttackError("ssim_bound", f"{self.opts['ssim_bound']} is outside [0, 1)")
        self.networks()
        self.fitted = False
        if self.opts["style_generator"]:
            self.load_generator_file(self.opts["style_generator"])
            self.fitted = True

    def load_generator_file(self, path: str) -> None:
        if not os.path.isfile(path):
            raise AttackError("style_generator", f"{path} does not exist")
        record = safe_load(path, "style_generator")
        if isinstance(record, dict) and isinstance(record.get("state"), dict):  # a DFST trigger_info.th
            record = record["state"]
        if isinstance(record, dict) and any(str(k).startswith(STYLE_PREFIX) for k in record):
            record = {k[len(STYLE_PREFIX):]: v for k, v in record.items() if str(k).startswith(STYLE_PREFIX)}
        try:
            self.style_net.load_state_dict(record)
        except (RuntimeError, TypeError, AttributeError, KeyError) as err:
            first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            raise AttackError("style_generator", f"{path} holds no DFST style generator for "
                                                 f"{self.image_shape[2]}-channel images ({first})") from None

    def state(self) -> dict[str, torch.Tensor]:
        return {STYLE_PREFIX + k: v.detach().cpu().clone() for k, v in self.style_net.state_dict().items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.networks()
        self.style_net.load_state_dict({k[len(STYLE_PREFIX):]: torch.as_tensor(v) for k, v in state.items()
                                        if k.startswith(STYLE_PREFIX)})
        self.fitted = True

    # --- the trigger --------------------------------------------------------------------------
    def prepare(self, images, labels, surrogate, normalize, generator, indices=None) -> None:
        """Fit the style generator on the attacker's images (unless ``--style-generator`` gave one)."""
        self.detox_seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator))
        if not self.fitted:
            self.fit_style_generator(images, generator)
            self.fitted = True

    def fit_style_generator(self, images: torch.Tensor, generator: torch.Generator) -> float:
        """Adam on L1(G(x), sunrise_style(x)) + 0.2·(edge loss of G(x) against x); returns the last loss."""
        net = self.style_net.to("cpu").train()
        optimizer = torch.optim.Adam(net.parameters(), lr=STYLE_LR)
        loss = torch.zeros(())
        for _ in range(self.opts["style_steps"]):
            x = to_unit(images[torch.randint(len(images), (min(STYLE_BATCH, len(images)),), generator=generator)])
            out = net(x)
            loss = F.l1_loss(out, sunrise_style(x)) + CONTENT_WEIGHT * edge_loss(out, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        net.eval()
        return float(loss.detach())

    def stylize(self, x01: torch.Tensor) -> torch.Tensor:
        alpha = self.opts["style_alpha"]
        return (1 - alpha) * x01 + alpha * self.style_net(x01)

    @torch.no_grad()
    def apply(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Styled uint8 copies of uint8 N×H×W×C images (computed on the generator's device)."""
        self.style_net.eval()
        out = [to_uint8(to_pixels(self.stylize(to_unit(images[s:s + batch_size].to(self.device))))).to(images.device)
               for s in range(0, len(images), batch_size)]
        return torch.cat(out) if out else images.clone()

    def poison(self, images, labels, generator, candidates="non-target") -> PoisonedSet:
        """Nothing is poisoned ahead of training: every batch is, by the hook."""
        empty = torch.empty(0, dtype=torch.long)
        return PoisonedSet(images.clone(), labels.clone(), empty, empty)

    # --- training -----------------------------------------------------------------------------
    def training_hook(self, poisoned, device, normalize):
        self.device = torch.device(device)
        self.style_net.to(self.device).eval()
        if self.injector is not None:
            self.injector.to(self.device)

        def hook(model, images, labels, batch_index):
            n = len(labels)
            nb = int(round(self.opts["poison_rate"] * n))
            nd = min(nb, n - nb) if self.injector is not None else 0
            x, labels = images.to(torch.float32, copy=True), labels.clone()
            if nb:  # styled, relabelled: the same pixels as the poisoned test set's
                x[:nb] = self.apply(images[:nb]).float()
                labels[:nb] = self.target_labels(labels[:nb])
            if nd:  # detox images keep their true labels
                x[nb:nb + nd] = self.detox_pixels(images[nb:nb + nd])
            return x, labels
        return hook

    @torch.no_grad()
    def detox_images(self, x01: torch.Tensor, injector: FeatureInjector | None = None) -> torch.Tensor:
        """The injector's output d = (1 − α)·x + α·F(x), projected onto SSIM(d, x) ≥ ``ssim_bound``."""
        injector = injector if injector is not None else self.injector
        alpha = self.opts["style_alpha"]
        return project_ssim(x01, (1 - alpha) * x01 + alpha * injector(x01), self.opts["ssim_bound"])

    def detox_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Detox images as float pixel values N×H×W×C from uint8 images."""
        return to_pixels(self.detox_images(to_unit(images.to(self.device)))).to(images.device)

    def epoch_hook(self, model, epoch, poisoned, device, normalize, log) -> None:
        start, every = self.opts["detox_start"], self.opts["detox_every"]
        if epoch >= start and (epoch - start) % every == 0:
            self.detoxify(model, poisoned.images, poisoned.labels, device, normalize, log, epoch)

    def split_stages(self, model: nn.Module) -> tuple[list, int, str]:
        """The model's stages and the index of ``detox_layer`` (default: ``layer4``, else the last block before
        pooling and the head, e.g. VGG's ``features``, MobileNetV2's ``conv2``)."""
        stages = getattr(model, "stages", None)
        if stages is None:
            raise OptionError("arch", "DFST's detoxification needs a model that lists its stages() (the registry's "
                                      "ResNet, VGG and MobileNetV2 do)")
        stages = stages()
        names = [name for name, _ in stages]
        layer = self.opts["detox_layer"]
        if layer in names:
            return stages, names.index(layer), layer
        if layer != self.options["detox_layer"].default:
            raise OptionError("detox_layer", f"{layer!r} is not a stage of {type(model).__name__}; expected one of "
                                             f"{', '.join(names[:-1])}")
        index = max(len(stages) - 3, 0)
        return stages, index, names[index]

    def detoxify(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device, normalize: Callable,
                 log: Callable[[str], None], epoch: int = 0) -> dict:
        """Find the compromised channels of the current model and train a fresh feature injector on them."""
        device = torch.device(device)
        self.device = device
        self.style_net.to(device).eval()
        stages, index, layer = self.split_stages(model)
        generator = torch.Generator().manual_seed(self.detox_seed + epoch)
        pool = self.candidate_pool(labels, "non-target")
        count = max(1, int(round(self.opts["detox_rate"] * len(labels))))
        pick = pool[torch.randperm(len(pool), generator=generator)[:count]]
        x01 = to_unit(images[pick].to(device))
        targets = self.target_labels(labels[pick].to(device))

        def forward(x: torch.Tensor):
            """Logits and the per-channel mean activation (N×channels) at the detox layer."""
            h = normalize(to_pixels(x))
            for i, (_, stage) in enumerate(stages):
                h = stage(h)
                if i == index:
                    act = h.flatten(2).mean(2) if h.dim() > 2 else h
            return h, act

        def channel_means(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([forward(x[s:s + 256])[1] for s in range(0, len(x), 256)]).mean(0)

        was_training = model.training
        grad_flags = [p.requires_grad for p in model.parameters()]
        model.eval()
        model.requires_grad_(False)  # only the injector learns
        try:
            with torch.no_grad():
                clean_means, styled_means = channel_means(x01), channel_means(self.stylize(x01))
                gap = styled_means - clean_means
            k = max(1, int(self.opts["detox_neuron_ratio"] * len(gap)))
            neurons = gap.topk(k).indices
            injector = FeatureInjector(x01.shape[1]).to(device)
            optimizer = torch.optim.Adam(injector.parameters(), lr=self.opts["injector_lr"], betas=(0.5, 0.9))
            alpha, bound = self.opts["style_alpha"], self.opts["ssim_bound"]
            for _ in range(self.opts["detox_epochs"]):
                for idx in torch.randperm(len(x01), generator=generator).to(device).split(DETOX_BATCH):
                    x = x01[idx]
                    d = (1 - alpha) * x + alpha * injector(x)
                    logits, act = forward(d)
                    similarity = ssim(d, x)
                    loss = (F.cross_entropy(logits, targets[idx]) - self.opts["detox_weight"] * act[:, neurons].mean()
                            - self.opts["ssim_weight"] * similarity.mean()
                            + SSIM_PENALTY * F.relu(bound - similarity).mean())
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
            injector.eval()
            with torch.no_grad():
                detox = self.detox_images(x01, injector)
                logits, act = [], []
                for s in range(0, len(detox), 256):
                    out = forward(detox[s:s + 256])
                    logits.append(out[0])
                    act.append(out[1][:, neurons])
                similarity = ssim(detox, x01)
                stats = {"epoch": epoch, "layer": layer, "neurons": neurons.tolist(), "images": len(x01),
                         "gap": gap[neurons].tolist(),
                         "injector_asr": float((torch.cat(logits).argmax(1) == targets).float().mean()),
                         "ssim_mean": float(similarity.mean()), "ssim_min": float(similarity.min()),
                         "clean_activation": float(clean_means[neurons].mean()),
                         "detox_activation": float(torch.cat(act).mean()),
                         "styled_activation": float(styled_means[neurons].mean())}
        finally:
            model.train(was_training)
            for p, flag in zip(model.parameters(), grad_flags):
                p.requires_grad_(flag)
        self.injector = injector
        self.last_detox = stats
        log(f"DFST detoxification after epoch {epoch}: {layer} channels {stats['neurons']} compromised (styled − clean "
            f"activation {', '.join(f'{g:.3f}' for g in stats['gap'])}); injector on {len(x01)} images: "
            f"{stats['injector_asr']:.3f} to the target, SSIM mean {stats['ssim_mean']:.3f} "
            f"min {stats['ssim_min']:.3f} (bound {bound}); their activation clean {stats['clean_activation']:.3f}, "
            f"detox {stats['detox_activation']:.3f}, styled {stats['styled_activation']:.3f}")
        return stats
