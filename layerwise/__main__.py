"""``python -m layerwise`` runs the command line."""

from layerwise.cli import main

main()
