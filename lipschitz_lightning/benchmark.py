"""``python -m lipschitz_lightning.benchmark``: the command lives in ``lipschitz_lightning.commands.benchmark``."""


def main() -> None:
    """The ``lipschitz-benchmark`` console script."""
    from lipschitz_lightning.commands.benchmark import main as benchmark

    benchmark()


if __name__ == "__main__":
    main()
