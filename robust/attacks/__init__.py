"""Input-space attacks: PGD and discrete adversarial (DAD / DAT) samples."""

from robust.attacks.dad import DADConfig, dad_samples
from robust.attacks.pgd import PGDConfig, pgd

__all__ = ["DADConfig", "PGDConfig", "dad_samples", "pgd"]
