"""`python -m instructrag_ray <job> ...`: the same as the `instructrag-ray` console script."""

from .cli import main

main()
