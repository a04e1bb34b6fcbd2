"""``python -m remote_autograd`` (and ``torchrun -m remote_autograd``): the console command."""

from .cli import main

__all__: list[str] = []

if __name__ == "__main__":
    main()
