"""``python -m deepfm`` (what ``torchrun -m deepfm train ...`` runs on every rank)."""

from deepfm.cli import main

main()
