"""The peers Sluice is compared against, each configured as equivalently as its options allow."""

__all__: list[str] = []
