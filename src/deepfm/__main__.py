"""``python -m deepfm`` (what ``torchrun -m deepfm train ...`` runs on every rank)."""

from deepfm.commands import main

main()
