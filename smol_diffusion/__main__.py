"""`python -m smol_diffusion COMMAND ...`: the same as the `smol-diffusion` command (cli.py)."""
from .cli import main

main()
