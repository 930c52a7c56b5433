"""Each network's optimizer as its paper's official training configuration states it, for
`bench train --recipe paper`: an equal-budget comparison should train every model the way its
authors did, only shorter. What we keep equal across models (data stream, crops, batch, loss,
budget) stays in TrainConfig; the schedule's shape is replaced by one cosine to zero over the
budget (its length is the one thing a short budget cannot copy), and each row says so.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from bench.errors import UsageError


@dataclass(frozen=True)
class Recipe:
    optimizer: str  # "adam" | "adamw"
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    source: str  # where the numbers come from, and the official schedule we replace

    def as_dict(self) -> dict:
        return asdict(self)


# Keyed by registered network (aliases resolve to theirs); a variant family shares its paper.
RECIPES = {
    "swinir": Recipe("adam", 2e-4, (0.9, 0.99), 0.0,
                     "SwinIR (KAIR options train_swinir_sr_classical.json / "
                     "train_swinir_denoising_color.json): Adam lr 2e-4, betas (0.9, 0.99), no "
                     "weight decay; official schedule: MultiStepLR halving at 250k/400k/450k/475k "
                     "of 500k iterations"),
    "restormer": Recipe("adamw", 3e-4, (0.9, 0.999), 1e-4,
                        "Restormer (Motion_Deblurring/Options/Deblurring_Restormer.yml): AdamW lr "
                        "3e-4, betas (0.9, 0.999), weight decay 1e-4; official schedule: cosine "
                        "annealing with one restart to 1e-6 over 300k iterations, progressive "
                        "patch sizes"),
    "nafnet": Recipe("adamw", 1e-3, (0.9, 0.9), 1e-3,
                     "NAFNet (options/train/GoPro/NAFNet-width64.yml): AdamW lr 1e-3, betas "
                     "(0.9, 0.9), weight decay 1e-3; official schedule: cosine annealing to 1e-7 "
                     "over 400k iterations, PSNR loss"),
    "mambair": Recipe("adam", 2e-4, (0.9, 0.99), 0.0,
                      "MambaIR (options/train/train_MambaIR_SR_x4.yml): Adam lr 2e-4, betas "
                      "(0.9, 0.99), no weight decay; official schedule: MultiStepLR halving at "
                      "250k/400k/450k/475k of 500k iterations"),
    "serpent": Recipe("adamw", 2e-4, (0.9, 0.999), 1e-4,
                      "Serpent: the paper's optimizer settings were not reachable from here (its "
                      "official code is published by the authors but could not be read); ours: "
                      "AdamW lr 2e-4, betas (0.9, 0.999), weight decay 1e-4, the suite's default"),
}


def recipe_for(network: str) -> Recipe:
    """The recipe of a registered network: its own entry, else its family's (nafnet_w32 ->
    nafnet, serpent_s -> serpent)."""
    for key in (network, network.split("_")[0]):
        if key in RECIPES:
            return RECIPES[key]
    raise UsageError(f"no paper recipe recorded for {network!r} (known: {', '.join(RECIPES)}); "
                     "train it with --recipe suite and explicit --lr/--weight-decay")
